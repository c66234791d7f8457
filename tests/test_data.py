import json
import re
from pathlib import Path
from collections import Counter, defaultdict

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emoshield.data import REFERENCE_CLASSES, canonical_label, load_dataset, make_split, parse_classes
from emoshield.data.images import decode_images, to_model_input
from emoshield.data.splits import load_split
from emoshield.errors import EmoshieldError
from tests.conftest import FIVE


def test_canonical_labels_and_class_parsing():
    assert canonical_label("Sadness") == "sad" and canonical_label("HA") == "happy"
    assert canonical_label("anger") == "angry" and canonical_label("cat") is None
    assert parse_classes(FIVE) == REFERENCE_CLASSES
    assert parse_classes("happiness,sadness") == ("happy", "sad")
    with pytest.raises(EmoshieldError, match="unknown class name 'joy ful'"):
        parse_classes("happy,joy ful")


def test_ckplus48_metadata_and_counts(data_root):
    ds = load_dataset("ckplus48", data_root)
    assert len(ds.records) == 981
    assert len({r.subject for r in ds.records}) == 118 and len({r.sequence for r in ds.records}) == 327
    assert ds.class_counts()["surprise"] == 249 and ds.class_counts()["angry"] == 135
    five = load_dataset("ckplus48", data_root, FIVE)
    assert len(five.records) == 792 and len({r.sequence for r in five.records}) == 264
    r = next(r for r in five.records if r.path.endswith("S010_006_00000013.png"))
    assert (r.subject, r.sequence, r.frame) == ("S010", "S010_006", 13)


def test_fer2013_official_split_counts(data_root):
    ds = load_dataset("fer2013", data_root)
    split = make_split(ds, "official")
    assert (len(split.train), len(split.val), len(split.test)) == (28709, 3589, 3589)
    assert Counter(r.label for r in split.test)["disgust"] == 55
    with pytest.raises(EmoshieldError, match="subject ids"):
        make_split(ds, "subject")


def test_jaffe_faces_detected_and_cropped(data_root):
    ds = load_dataset("jaffe", data_root)
    assert len(ds.records) + len(ds.skipped) == 213
    assert len(ds.records) >= 200  # the Haar cascade finds nearly every JAFFE face
    assert len({r.subject for r in ds.records}) == 10
    assert all(r.crop is not None and r.crop[2] < 256 for r in ds.records)
    decoded = decode_images(ds.root, ds.records[:8], 48)
    assert decoded.pixels.shape == (8, 1, 48, 48)  # grayscale TIFFs stay one channel


def test_reference_split_puts_every_sequence_in_all_three(data_root):
    ds = load_dataset("ckplus48", data_root, FIVE)
    split = make_split(ds, "reference", seed=3)
    seen = defaultdict(Counter)
    for name, part in split.parts().items():
        for r in part:
            seen[r.sequence][name] += 1
    assert all(c == Counter(train=1, val=1, test=1) for c in seen.values())  # 3 frames -> 1/1/1
    again = make_split(ds, "reference", seed=3)
    assert [r.path for r in again.test] == [r.path for r in split.test]
    other = make_split(ds, "reference", seed=4)
    assert [r.path for r in other.test] != [r.path for r in split.test]


def test_reference_split_80_10_10_on_long_sequences():
    from emoshield.data.records import ImageRecord
    from emoshield.data.splits import reference_split

    records = [ImageRecord(f"v{v}/{f}.png", "happy", "s", f"v{v}", f) for v in range(3) for f in range(100)]
    split = reference_split(records, seed=0)
    assert (len(split.train), len(split.val), len(split.test)) == (240, 30, 30)
    no_val = reference_split(records, seed=0, validation=False)
    assert (len(no_val.train), len(no_val.val), len(no_val.test)) == (270, 0, 30)
    assert [r.path for r in no_val.test] == [r.path for r in split.test]  # same test frames


def test_reference_split_without_validation_is_the_prototypes_2_1(data_root):
    ds = load_dataset("ckplus48", data_root, FIVE)
    split = make_split(ds, "reference", seed=0, val_fraction=0)
    per_sequence = defaultdict(Counter)
    for name, part in split.parts().items():
        for r in part:
            per_sequence[r.sequence][name] += 1
    assert all(c == Counter(train=2, test=1) for c in per_sequence.values())


def test_subject_split_is_subject_independent(data_root):
    ds = load_dataset("ckplus48", data_root, FIVE)
    all_test = set()
    for fold in range(5):
        split = make_split(ds, "subject", fold=fold, folds=5, seed=0)
        subjects = {name: {r.subject for r in part} for name, part in split.parts().items()}
        assert not subjects["train"] & subjects["test"] and not subjects["val"] & subjects["test"]
        assert not subjects["train"] & subjects["val"] and subjects["val"]
        assert all_test.isdisjoint(subjects["test"])
        all_test |= subjects["test"]
        assert sum(len(p) for p in split.parts().values()) == 792
    assert all_test == {r.subject for r in ds.records}
    with pytest.raises(EmoshieldError, match="--fold"):
        make_split(ds, "subject", fold=5, folds=5)


@settings(max_examples=60, deadline=None)
@given(subjects=st.integers(4, 14), outer_folds=st.integers(2, 4), data=st.data())
def test_a_nested_split_never_holds_its_outer_folds_test_people(subjects, outer_folds, data):
    """--nested-in K/N: every inner fold of fold K's training people is subject-independent, holds
    none of fold K's test people (the same seed makes both), and the inner folds' tests cover the rest."""
    from emoshield.data.datasets import FaceDataset
    from emoshield.data.records import ImageRecord

    records = [ImageRecord(f"p{s}_{i}.png", ("happy", "sad")[i % 2], f"P{s:02d}", f"P{s:02d}", i)
               for s in range(subjects) for i in range(3)]
    ds = FaceDataset("folder", Path("/nowhere"), records, ("happy", "sad"))
    outer = data.draw(st.integers(0, outer_folds - 1))
    seed = data.draw(st.integers(0, 3))
    outer_test = {r.subject for r in make_split(ds, "subject", outer, outer_folds, seed).test}
    rest = {r.subject for r in records} - outer_test
    inner_folds = data.draw(st.integers(2, len(rest)))  # >= 2: 4+ people, at most half held out
    covered = set()
    for fold in range(inner_folds):
        split = make_split(ds, "subject", fold, inner_folds, seed, nested_in=(outer, outer_folds))
        people = {name: {r.subject for r in part} for name, part in split.parts().items()}
        assert not (people["train"] | people["val"] | people["test"]) & outer_test
        assert not people["train"] & people["test"] and not people["val"] & people["test"]
        assert not people["train"] & people["val"] and split.nested_in == (outer, outer_folds)
        covered |= people["test"]
    assert covered == rest


def test_nested_splits_are_refused_where_they_mean_nothing(tmp_path, data_root):
    ds = load_dataset("jaffe", data_root)
    with pytest.raises(EmoshieldError, match="--nested-in splits subject folds; it needs --protocol subject"):
        make_split(ds, "reference", nested_in=(0, 5))
    with pytest.raises(EmoshieldError, match="--nested-in fold must be between 0 and 4, got 5"):
        make_split(ds, "subject", nested_in=(5, 5))
    with pytest.raises(EmoshieldError, match=r"--nested-in folds must be between 2 and the number of subjects \(10\)"):
        make_split(ds, "subject", nested_in=(0, 11))
    # JAFFE: 10 people, 2 held out by outer fold 1; 8 left, so at most 8 inner folds
    with pytest.raises(EmoshieldError, match=r"--folds must be between 2 and the number of subjects outside fold "
                                             r"1/5's test part \(8\)"):
        make_split(ds, "subject", 0, 9, nested_in=(1, 5))
    split = make_split(ds, "subject", 2, 4, nested_in=(1, 5))
    split.save(tmp_path / "split.json", ds)
    assert json.loads((tmp_path / "split.json").read_text())["nested_in"] == {"fold": 1, "folds": 5}
    back, _ = load_split(tmp_path / "split.json")
    assert back.nested_in == (1, 5) and back.test == split.test
    make_split(ds, "subject", 2).save(tmp_path / "plain.json", ds)  # an ordinary split's file reads as before
    assert "nested_in" not in json.loads((tmp_path / "plain.json").read_text())


def test_split_json_roundtrip(tmp_path, data_root):
    ds = load_dataset("ckplus48", data_root, FIVE)
    split = make_split(ds, "subject", fold=1)
    split.save(tmp_path / "split.json", ds)
    entries = json.loads((tmp_path / "split.json").read_text())["entries"]
    assert {"path", "label", "subject", "sequence", "split"} <= set(entries[0])
    back, header = load_split(tmp_path / "split.json")
    assert back.test == split.test and header["classes"] == list(REFERENCE_CLASSES) and header["fold"] == 1


def _write_folder(root, per_class=3, corrupt=False):
    rng = np.random.default_rng(0)
    for cls in ("happy", "sadness"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            cv2.imwrite(str(root / cls / f"p{i}_{cls}.png"), rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    if corrupt:
        (root / "happy" / "broken.png").write_bytes(b"\x89PNG not really")


def test_folder_dataset_color_and_corrupt_images(tmp_path):
    _write_folder(tmp_path, corrupt=True)
    ds = load_dataset("folder", tmp_path)
    assert ds.classes == ("happy", "sad") and len(ds.records) == 7
    with pytest.warns(UserWarning, match="skipped 1 unreadable image.*broken.png"):
        decoded = decode_images(ds.root, ds.records, 32)
    assert decoded.pixels.shape == (6, 3, 32, 32) and decoded.failures[0][0].endswith("broken.png")
    import torch

    x = to_model_input(torch.from_numpy(decoded.pixels))
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


def test_bad_dataset_folders(tmp_path):
    with pytest.raises(EmoshieldError, match="does not exist"):
        load_dataset("folder", tmp_path / "missing")
    (tmp_path / "happy").mkdir()
    with pytest.raises(EmoshieldError, match="no folder images"):
        load_dataset("folder", tmp_path)
    (tmp_path / "cats").mkdir()
    with pytest.raises(EmoshieldError, match="'cats' is not an emotion class"):
        load_dataset("folder", tmp_path)


def test_liris_layout_reads_videos_as_sequences(tmp_path, data_root, monkeypatch):
    """A LIRIS-style folder of videos built from real CK+ frames."""
    ck = load_dataset("ckplus48", data_root, FIVE)
    for label, folder in (("happy", "happiness"), ("sad", "sadness")):
        (tmp_path / folder).mkdir()
        seqs = sorted({r.sequence for r in ck.records if r.label == label})[:2]
        for seq in seqs:
            frames = sorted((r for r in ck.records if r.sequence == seq), key=lambda r: r.frame)
            writer = cv2.VideoWriter(str(tmp_path / folder / f"{seq}.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (48, 48))
            for r in frames * 4:  # 12 frames per video
                writer.write(cv2.imread(str(ck.root / r.path)))
            writer.release()
    ds = load_dataset("liris", tmp_path, subject_pattern=r"^(S\d+)")
    assert len(ds.records) == 4 * 12 and len({r.sequence for r in ds.records}) == 4
    assert {r.subject for r in ds.records} <= {r.subject for r in ck.records}
    split = make_split(ds, "reference")
    assert (len(split.train), len(split.val), len(split.test)) == (40, 4, 4)
    decoded = decode_images(ds.root, split.test, 48)
    assert decoded.pixels.shape == (4, 3, 48, 48) and not decoded.failures  # video frames decode as colour
    for pixels, record in zip(decoded.pixels, decoded.records):  # frame k of the video is CK+ frame k % 3
        video_seq = [r for r in ck.records if r.sequence == record.sequence.split("/")[-1][:-4]]
        source = sorted(video_seq, key=lambda r: r.frame)[record.frame % 3]
        original = cv2.imread(str(ck.root / source.path), cv2.IMREAD_GRAYSCALE).astype(float)
        assert np.abs(pixels.mean(0) - original).mean() < 8  # MJPEG is lossy, but it is the same face
    # a header may declare any frame count, and each frame would become a record: past the cap the
    # video is skipped with its reason
    from emoshield.data import datasets

    monkeypatch.setattr(datasets, "MAX_VIDEO_FRAMES", 11)
    records, skipped = datasets.scan_liris(tmp_path)
    assert records == [] and len(skipped) == 4 and all("declares 12 frames" in why for _, why in skipped)


_ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                     max_size=3), max_leaves=10)
_ENTRY = {"path": "S005/a.png", "label": "happy", "subject": "S005", "sequence": "S005_001", "frame": 1, "split": "test"}


@settings(max_examples=200, deadline=None)
@given(st.one_of(
    st.binary(max_size=40), st.just(b"[" * 50_000), _ANY_JSON.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda field, value: json.dumps({"protocol": "subject", "seed": 0, "entries": [{**_ENTRY, field: value}]}).encode(),
              st.sampled_from(sorted(_ENTRY) + ["crop", "source_split"]), _ANY_JSON),
    st.builds(lambda extra: json.dumps({"protocol": "subject", "seed": 0, "entries": [_ENTRY],
                                        "extra_train": extra}).encode(),
              _ANY_JSON | st.builds(lambda field, value: [{"dataset": "fer2013", "dataset_dir": "/d",
                                                           "entries": [{**_ENTRY, field: value}]}],
                                    st.sampled_from(sorted(_ENTRY) + ["crop", "source_split"]), _ANY_JSON)),
    st.builds(lambda nested: json.dumps({"protocol": "subject", "seed": 0, "entries": [_ENTRY],
                                         "nested_in": nested}).encode(),
              _ANY_JSON | st.fixed_dictionaries({"fold": _ANY_JSON, "folds": _ANY_JSON}))))
def test_any_split_file_loads_or_is_refused_in_one_line(tmp_path_factory, content):
    """`evaluate` and `bundle export` read a model's split.json back: a file cut short, edited or
    written by something else loads into well-typed records or is one line naming it."""
    path = tmp_path_factory.mktemp("split") / "split.json"
    path.write_bytes(content)
    try:
        split, _header = load_split(path)
    except EmoshieldError as error:
        assert "\n" not in str(error) and str(path) in str(error)
        return
    for record in split.test + [r for extra in split.extra_train for r in extra.records]:
        assert isinstance(record.path, str) and isinstance(record.frame, int) and hash(record)
    assert split.nested_in is None or all(isinstance(v, int) for v in split.nested_in)


def test_extra_training_faces_join_the_training_part_only_and_are_never_tested_on(tmp_path, data_root):
    """`--extra-train`: another dataset's faces of the run's classes (its own training part where it
    has a split) join training; validation and test stay the run's own held-out people; the split
    file names every extra face, and evaluating the model on them is refused."""
    from emoshield.pipeline import DataOptions, _refuse_training_images, extra_training_faces, prepare_data

    options = DataOptions(dataset="ckplus48", data_root=str(data_root), protocol="subject", fold=1,
                          classes="happy,sad,contempt", limit_per_class=12)
    alone = prepare_data(options, 32)
    options.extra_train = ["fer2013"]
    joined = prepare_data(options, 32)
    extra = joined.split.extra_train[0]
    assert extra.dataset == "fer2013" and extra.records
    assert {r.label for r in extra.records} == {"happy", "sad"}  # fer2013 has no contempt
    assert {r.source_split for r in extra.records} == {"train"}  # its PrivateTest stays unseen
    assert len(joined.parts["train"]) == len(alone.parts["train"]) + len(extra.records)
    for part in ("val", "test"):
        assert joined.split.parts()[part] == alone.split.parts()[part]
        assert joined.parts[part].labels.tolist() == alone.parts[part].labels.tolist()
    classes = list(joined.dataset.classes)
    assert joined.parts["train"].labels[-len(extra.records):].tolist() == [classes.index(r.label) for r in extra.records]

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    joined.split.save(model_dir / "split.json", joined.dataset)
    back, header = load_split(model_dir / "split.json")
    assert back.extra_train[0].records == extra.records and "extra_train" not in header
    assert back.test == joined.split.test
    fer = load_dataset("fer2013", data_root, "happy,sad")
    unseen = [r for r in fer.records if r.source_split == "test"][:20]
    _refuse_training_images(model_dir / "model.safetensors", "fer2013", unseen)  # PrivateTest: new faces
    with pytest.raises(EmoshieldError, match="1 of the 21 images chosen for testing were in this model's training"):
        _refuse_training_images(model_dir / "model.safetensors", "fer2013", unseen + extra.records[:1])
    # a split file without extra faces is written as before
    alone.split.save(tmp_path / "alone.json", alone.dataset)
    assert "extra_train" not in json.loads((tmp_path / "alone.json").read_text())

    with pytest.raises(EmoshieldError, match="--extra-train ckplus48 is the dataset being split"):
        extra_training_faces("ckplus48", options, joined.dataset)
    neutral = load_dataset("fer2013", data_root, "neutral,happy")
    neutral.classes = ("neutral",)
    with pytest.raises(EmoshieldError, match="--extra-train ckplus48 has none of the run's classes"):
        extra_training_faces("ckplus48", DataOptions(dataset="fer2013", data_root=str(data_root)), neutral)


def test_extra_faces_come_from_their_own_folder_beside_the_runs_never_from_the_runs(tmp_path, data_root):
    """The extra dataset's folder is DATA_ROOT/NAME, with no fallback: a data root that is the run's
    own folder would otherwise be read as the other dataset, and its test faces would be trained on."""
    from emoshield.pipeline import DataOptions, prepare_data

    for options, message in (
            (DataOptions(dataset="folder", data_root=str(data_root / "ckplus48"), extra_train=["ckplus48"]),
             "--extra-train needs a named dataset"),
            (DataOptions(dataset="ckplus48", data_root=str(data_root / "ckplus48"), extra_train=["jaffe"]),
             f"--extra-train jaffe: no folder {data_root / 'ckplus48' / 'jaffe'}"),
            (DataOptions(dataset="ckplus48", data_root=str(data_root), extra_train=["nope"]),
             "--extra-train is one of fer2013, ckplus48, jaffe, liris, not 'nope'")):
        with pytest.raises(EmoshieldError, match=re.escape(message)):
            prepare_data(options, 32)
    # the run's own images under the other dataset's name: refused, not trained on; the other
    # dataset's folder is the run's, holds it, or sits inside it
    own = tmp_path / "root" / "ckplus48"
    (own / "happy").mkdir(parents=True)  # a real folder inside the run's: its faces linked one by one
    for face in sorted((data_root / "ckplus48" / "happy").iterdir())[:12]:
        (own / "happy" / face.name).symlink_to(face)
    (own / "sadness").symlink_to(data_root / "ckplus48" / "sadness")
    for other, target in (("fer2013", own), ("liris", tmp_path / "root"), ("jaffe", own / "happy")):
        (tmp_path / "root" / other).symlink_to(target)
        with pytest.raises(EmoshieldError, match=f"--extra-train {other}: .* holds the run's own images"):
            prepare_data(DataOptions(dataset="ckplus48", data_root=str(tmp_path / "root"),
                                     limit_per_class=6, extra_train=[other]), 32)


def test_extra_faces_in_a_nested_dataset_folder_are_read_from_there(tmp_path, data_root):
    """DATA_ROOT/jaffe/jaffe (a layout every dataset accepts): the faces are decoded from where the
    scan found them, not lost as unreadable."""
    from emoshield.pipeline import DataOptions, prepare_data

    (tmp_path / "ckplus48").symlink_to(data_root / "ckplus48")
    (tmp_path / "jaffe").mkdir()
    (tmp_path / "jaffe" / "jaffe").symlink_to(data_root / "jaffe")
    options = DataOptions(dataset="ckplus48", data_root=str(tmp_path), classes="happy,sad", limit_per_class=6)
    alone = prepare_data(options, 32)
    options.extra_train = ["jaffe"]
    joined = prepare_data(options, 32)
    extra = joined.split.extra_train[0]
    assert len(extra.records) >= 12 and not joined.failures  # ~6 per class (--limit-per-class), all readable
    assert Path(extra.dataset_dir) == (data_root / "jaffe").resolve()
    assert len(joined.parts["train"]) == len(alone.parts["train"]) + len(extra.records)


def test_every_person_of_an_extra_dataset_is_refused_for_testing(tmp_path, data_root):
    """CK+48's happy and sad faces joined a JAFFE run's training: an unseen face of one of those
    people (another class) is not a new face either; other people's are."""
    from emoshield.pipeline import DataOptions, _refuse_training_images, prepare_data

    prepared = prepare_data(DataOptions(dataset="jaffe", data_root=str(data_root), protocol="subject",
                                        classes="happy,sad", extra_train=["ckplus48"]), 32)
    seen = prepared.split.extra_train[0].records
    prepared.split.save(tmp_path / "split.json", prepared.dataset)
    people = {r.subject for r in seen}
    ckplus48 = load_dataset("ckplus48", data_root)
    theirs = [r for r in ckplus48.records if r.subject in people and r not in seen]
    others = [r for r in ckplus48.records if r.subject not in people]
    assert theirs and others and {r.label for r in theirs} - {"happy", "sad"}
    _refuse_training_images(tmp_path / "model.safetensors", "ckplus48", others)
    with pytest.raises(EmoshieldError, match="0 of the 1 images .* and 1 show its training/validation subjects"):
        _refuse_training_images(tmp_path / "model.safetensors", "ckplus48", theirs[:1])


def test_grayscale_and_colour_training_faces_join_as_colour():
    import torch

    from emoshield.pipeline import _joined
    from emoshield.training import TensorData

    gray = TensorData(torch.arange(2 * 16, dtype=torch.uint8).reshape(2, 1, 4, 4), torch.tensor([0, 1]))
    colour = TensorData(torch.full((3, 3, 4, 4), 7, dtype=torch.uint8), torch.tensor([1, 1, 0]))
    for a, b in ((gray, colour), (colour, gray)):
        joined = _joined(a, b)
        assert joined.pixels.shape == (5, 3, 4, 4) and joined.labels.tolist() == a.labels.tolist() + b.labels.tolist()
    joined = _joined(gray, colour)
    assert all(torch.equal(joined.pixels[:2, c], gray.pixels[:, 0]) for c in range(3))
    assert _joined(gray, gray).pixels.shape == (4, 1, 4, 4)
