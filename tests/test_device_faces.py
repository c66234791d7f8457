"""Every face in the frame: the tracker that follows faces between detections, and the device's
multi-face output on a video of two real CK+ faces per frame."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emoshield.device.tracking import AUTO_EVERY, MAX_MISSED, FaceTracker, iou
from tests.test_cli import run


def _scene(positions: list[tuple[int, int]], size: int = 60, seed: int = 0) -> np.ndarray:
    """A 640 x 480 grey frame with a textured square 'face' at each position (textures differ)."""
    frame = np.full((480, 640, 3), 96, np.uint8)
    for k, (x, y) in enumerate(positions):
        texture = np.random.default_rng(seed + k).integers(0, 255, (size // 4, size // 4), dtype=np.uint8)
        patch = cv2.resize(texture, (size, size), interpolation=cv2.INTER_CUBIC)
        frame[y:y + size, x:x + size] = patch[..., None]
    return frame


class Detector:
    """Finds the squares where the scene put them (the truth), counting its calls."""

    def __init__(self):
        self.calls = 0
        self.boxes: list[tuple[int, int, int, int]] = []

    def __call__(self, frame):
        self.calls += 1
        return list(self.boxes)


def test_tracker_follows_moving_faces_between_detections_with_stable_ids():
    detect = Detector()
    tracker = FaceTracker(detect, detect_every=5)
    ids = None
    for t in range(30):
        positions = [(100 + 3 * t, 150 + t), (400 - 2 * t, 200)]  # both move every frame
        detect.boxes = [(x, y, 60, 60) for x, y in positions]
        tracks = tracker.update(_scene(positions))
        assert len(tracks) == 2
        by_x = sorted(tracks, key=lambda tr: tr.box[0])
        current = [tr.id for tr in by_x]  # they never cross: the left one keeps the left id
        assert ids is None or current == ids
        ids = current
        for tr in tracks:  # followed to within a pixel or two, detected or not
            assert max(iou(tr.box, b) for b in detect.boxes) > 0.85
    assert detect.calls == 6  # every 5th frame: 0, 5, ..., 25


def test_tracker_detects_at_once_when_a_face_is_lost_and_ends_its_track():
    detect = Detector()
    tracker = FaceTracker(detect, detect_every=8)
    detect.boxes = [(200, 200, 60, 60)]
    first = tracker.update(_scene([(200, 200)]))[0]
    assert tracker.update(_scene([(202, 200)]))[0].id == first.id and detect.calls == 1
    detect.boxes = []
    tracker.update(_scene([]))  # the face left: the match fails, a detection runs on this frame
    assert detect.calls == 2 and all(tr.lost for tr in tracker.tracks)
    for _ in range(MAX_MISSED):
        tracker.update(_scene([]))
    assert tracker.tracks == []  # ended after missing MAX_MISSED + 1 detections
    detect.boxes = [(300, 100, 60, 60)]
    again = tracker.update(_scene([(300, 100)], seed=5))
    assert len(again) == 1 and again[0].id != first.id  # someone new: a new id


def test_automatic_interval_follows_the_measured_costs():
    def slow(frame):
        import time

        time.sleep(0.02)
        return [(200, 200, 60, 60)]

    tracker = FaceTracker(slow, detect_every=0)
    assert tracker.interval == AUTO_EVERY[0]  # nothing measured yet
    tracker.update(_scene([(200, 200)]))
    tracker.note_frame_seconds(0.001)  # detection 20x the rest of a frame: detect rarely
    assert tracker.interval == AUTO_EVERY[1]
    tracker._frame_seconds = 0.05  # detection cheap next to the rest: as often as allowed
    assert tracker.interval == AUTO_EVERY[0]
    # 20 ms / 5 ms: detection a third of the time needs every 8th frame (the detection cost set,
    # not measured: a sleep(0.02) that overran by 1.5 ms on a busy machine made it 9)
    tracker._detect_seconds, tracker._frame_seconds = 0.02, 0.005
    assert tracker.interval == 8


@pytest.mark.parametrize("frame", [np.zeros((480, 640, 3), np.uint8), np.zeros((10, 10, 3), np.uint8)])
def test_tracker_survives_flat_and_tiny_frames(frame):
    detect = Detector()
    detect.boxes = [(0, 0, 8, 8)]
    tracker = FaceTracker(detect, detect_every=3)
    for _ in range(4):
        tracker.update(frame)  # flat patches give NaN correlations: lost, never a crash


def test_device_reports_every_face_with_stable_tracks_on_a_two_face_video(bundle, keys, trained, tmp_path):
    video = tmp_path / "two.mp4"
    run("data", "video", "--model", trained, "--per-class", "2", "--hold", "6", "--faces-per-frame", "2",
        "--face-px", "150", "--out", video)
    truth = json.loads((tmp_path / "two.mp4.labels.json").read_text())
    assert truth["faces_per_frame"] == 2 and all(len(f) == 2 for f in truth["faces"])
    summaries = {}
    for name, options in (("default", []), ("every-frame", ["--detect-every", "1", "--detect-width", "0"])):
        out = tmp_path / name
        proc = run("device", "run", "--source", video, "--bundle", bundle, "--pubkey", keys / "public.key",
                   "--jsonl", f"{out}.jsonl", "--truth", tmp_path / "two.mp4.labels.json", "--threads", "1",
                   "--summary", f"{out}.json", "--annotate", f"{out}.mp4", "--metrics", f"{out}.prom", *options)
        assert "every face:" in proc.stderr and "track switches" in proc.stderr
        summaries[name] = json.loads((tmp_path / f"{name}.json").read_text())
        # the same run in Prometheus text format, as a scraper parses it
        from prometheus_client.parser import text_string_to_metric_families

        metrics = {s.name: s.value for family in text_string_to_metric_families((tmp_path / f"{name}.prom").read_text())
                   for s in family.samples}
        summary = summaries[name]
        assert metrics["emoshield_device_frames_total"] == summary["frames"] == len(truth["faces"])
        assert metrics["emoshield_device_faces_total"] == summary["faces"] > 0
        assert metrics["emoshield_device_frames_with_face_total"] == summary["frames_with_face"]
        assert metrics["emoshield_device_fps"] == pytest.approx(summary["fps"])
        assert metrics["emoshield_device_running_version"] == summary["bundle_version"] >= 1
        assert metrics["emoshield_device_int8"] == (summary["precision"] == "int8")
        assert metrics["emoshield_device_self_check_agreement"] == pytest.approx(summary["self_check"]["agreement"])
        assert metrics["emoshield_device_peak_rss_bytes"] == pytest.approx(summary["peak_rss_mb"] * 2**20)
        lines = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert len(lines) == len(truth["faces"])
        for line in lines:
            assert len(line["faces"]) <= 2
            for face in line["faces"]:
                assert face["label"] in face["probabilities"] and abs(sum(face["probabilities"].values()) - 1) < 1e-3
            if line["faces"]:  # the top-level fields are the largest face's
                assert line["box"] == line["faces"][0]["box"] and line["label"] == line["faces"][0]["label"]
        # labels scored per face: the summary's figure is what the JSON lines say
        right = total = 0
        for line, present in zip(lines, truth["faces"]):
            for true in present:
                total += 1
                match = [f for f in line["faces"] if iou(tuple(f["box"]), tuple(true["box"])) >= 0.3]
                right += bool(match) and max(match, key=lambda f: iou(tuple(f["box"]), tuple(true["box"])))[
                    "label"] == true["label"]
        assert summaries[name]["faces_scored"] == total
        assert summaries[name]["face_accuracy_all"] == pytest.approx(right / total)
    default, every = summaries["default"], summaries["every-frame"]
    # both people found on (almost) every frame, one stable track id each, none swapped
    assert default["face_detection_rate"] >= 0.95 and default["faces"] >= 0.95 * 2 * len(truth["faces"])
    assert default["track_switches"] == 0
    ids = default["track_ids_per_slot"]
    assert len(ids) == 2 and all(len(v) == 1 for v in ids.values()) and ids["0"] != ids["1"]
    # detection ran on a fraction of the frames, and tracking did not lose faces doing so
    assert default["detections"] <= len(truth["faces"]) / 2 < every["detections"]
    assert default["face_detection_rate"] >= every["face_detection_rate"] - 0.02
    # the annotated video draws both faces: boxes and labels in both halves of the first frame; the
    # second pass (`device annotate`, from the JSON lines) draws the same picture as --annotate did
    proc = run("device", "annotate", "--source", video, "--jsonl", tmp_path / "default.jsonl",
               "--out", tmp_path / "second.mp4")
    assert f"on {len(truth['faces'])} frames" in proc.stdout
    frames = []
    for path in (video, tmp_path / "default.mp4", tmp_path / "second.mp4"):
        capture = cv2.VideoCapture(str(path))
        ok, frame = capture.read()
        assert ok and capture.get(cv2.CAP_PROP_FRAME_COUNT) == len(truth["faces"])
        capture.release()
        frames.append(frame.astype(int))
    for annotated in frames[1:]:  # both people's boxes and labels, in each pass
        drawn = np.abs(frames[0] - annotated).sum(2) > 150
        assert drawn[:, :320].sum() > 300 and drawn[:, 320:].sum() > 300
    assert np.abs(frames[1] - frames[2]).mean() < 1.0


def test_metrics_file_that_cannot_be_written_is_one_line_and_the_run_goes_on(tmp_path, capsys):
    from emoshield.device.run import write_metrics

    write_metrics(tmp_path / "missing" / "device.prom", {"frames": 3, "version": 1})
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--metrics" in err and "device.prom" in err
    write_metrics(tmp_path / "device.prom", {"frames": 3, "version": 1, "precision": "fp32"})
    text = (tmp_path / "device.prom").read_text()
    assert "emoshield_device_frames_total 3.0" in text and "emoshield_device_int8 0.0" in text
    assert "fps" not in text  # what the run does not know yet is left out, not reported as 0


def test_annotate_refuses_records_that_are_not_a_runs_with_one_line(tmp_path, capsys):
    """`device annotate` reads a file from elsewhere: malformed, hostile or foreign JSON lines stop with
    the line's number; a last line cut short by a killed run is skipped. (In-process through the CLI's
    main, as the `emoshield` command runs it; one real process at the end.)"""
    from emoshield.cli import main
    from emoshield.data.video import write_face_video

    video = tmp_path / "v.mp4"
    write_face_video([np.full((48, 48), 128, np.uint8)] * 2, ["happy"] * 2, video, face_px=100, hold=2)

    def annotate(lines: Path, out: Path) -> tuple[int, str, str]:
        code = main(["device", "annotate", "--source", str(video), "--jsonl", str(lines), "--out", str(out)])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    face = {"track": 0, "box": [10, 10, 50, 50], "label": "happy", "probabilities": {"happy": 0.9, "sad": 0.1}}
    good = json.dumps({"frame": 0, "faces": [face]})
    bad_faces = [{**face, "box": [1, 2, 3]}, {**face, "box": [0, 0, -5, 5]}, {**face, "track": -1},
                 {**face, "track": True}, {**face, "label": "angry"}, {**face, "probabilities": {"happy": "x"}},
                 {**face, "box": [0, 0, 10**30, 5]}, {**face, "probabilities": {}}, "face",
                 {**face, "probabilities": {"happy": 10**400}}, {**face, "probabilities": {"happy": 1.5}},
                 {**face, "probabilities": {"happy": -0.1}}, {**face, "label": "x" * 65, "probabilities": {"x" * 65: 1}}]
    # a lone surrogate (crashed cv2.putText with a segfault), NaN, a control character in a class name
    raw_faces = [b'{"track": 0, "box": [1, 1, 9, 9], "label": "\\ud800", "probabilities": {"\\ud800": 1}}',
                 b'{"track": 0, "box": [1, 1, 9, 9], "label": "happy", "probabilities": {"happy": NaN}}',
                 b'{"track": 0, "box": [1, 1, 9, 9], "label": "a\\nb", "probabilities": {"a\\nb": 1}}']
    cases = [*(b'{"frame": 1, "faces": [' + f + b']}' for f in raw_faces),
             b"not json", b"[1, 2]", b'{"frame": -1}', b'{"frame": 0.5}', "\u00e9t\u00e9".encode(), b"\xff\xfe",
             b"[" * 100000, b'{"frame": 1, "faces": "x"}', b'{"frame": 1, "faces": [], "x": "' + b"a" * (1 << 20) + b'"}',
             *(json.dumps({"frame": 1, "faces": [f]}).encode() for f in bad_faces)]
    lines = tmp_path / "bad.jsonl"
    for case in cases:
        lines.write_bytes(good.encode() + b"\n" + case + b"\n")
        code, _, err = annotate(lines, tmp_path / "out.mp4")
        assert code == 2 and err.count("\n") == 1 and "line 2" in err, (case[:40], err)
    lines.write_text(good + "\n" + '{"frame": 1, "fa')  # killed mid-line: the rest is drawn
    code, out, _ = annotate(lines, tmp_path / "out.mp4")
    assert code == 0 and "1 faces on 4 frames" in out
    lines.write_text(json.dumps({"frame": 99, "faces": [face]}) + "\n")  # another video's run
    code, _, err = annotate(lines, tmp_path / "foreign.mp4")
    assert code == 2 and "past the end" in err and not (tmp_path / "foreign.mp4").exists()
    for empty in (b"", b"\n\n"):
        lines.write_bytes(empty)
        code, _, err = annotate(lines, tmp_path / "e.mp4")
        assert code == 2 and "no frame records" in err
    code, _, err = annotate(lines, video)  # never over its own source
    assert code == 2 and "is the source video" in err and video.stat().st_size > 1000
    # the real command: exit status 2 and one line on stderr
    lines.write_bytes(good.encode() + b"\n" + b"not json\n")
    proc = run("device", "annotate", "--source", video, "--jsonl", lines, "--out", tmp_path / "out.mp4",
               check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "line 2" in proc.stderr


def test_video_writer_refuses_faces_that_do_not_fit(tmp_path):
    from emoshield.data.video import write_face_video
    from emoshield.errors import EmoshieldError

    face = np.zeros((48, 48), np.uint8)
    with pytest.raises(EmoshieldError, match="do not fit"):
        write_face_video([face] * 4, ["a"] * 4, tmp_path / "v.mp4", face_px=200, per_frame=3)
    with pytest.raises(EmoshieldError, match=">= 1"):
        write_face_video([face], ["a"], tmp_path / "v.mp4", per_frame=0)


def test_device_flags_out_of_range_are_one_line_errors(bundle, keys, tmp_path):
    for flag, value in (("--detect-every", "-1"), ("--detect-width", "-5"), ("--max-faces", "0")):
        proc = run("device", "run", "--source", tmp_path, "--bundle", bundle, "--pubkey", keys / "public.key",
                   flag, value, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and flag.lstrip("-").split("-")[0] in proc.stderr


def test_the_device_frames_faces_as_the_training_images_are_framed(bundle, trained):
    """The bundle's crop margin is measured on its training faces (CK+48 ships tight crops: ~0, not
    the 10% a Haar-cropped dataset gets), so a face the device finds in a camera frame is classified
    as the model classifies that face's own test image. With the old fixed 10% the device saw a
    face framed differently and its labels drifted from the model's (issue 16: the demo's device
    measured 66% where the edge predicted 87%)."""
    from emoshield.data.faces import face_detector
    from emoshield.data.video import _padded
    from emoshield.device.recognizer import load_classifier
    from emoshield.pipeline import decode_split_part
    from emoshield.tiers.bundle import read_manifest

    margin = read_manifest(bundle)["preprocessing"]["face_margin"]
    assert -0.1 <= margin <= 0.05 and read_manifest(bundle)["preprocessing"]["face_margin_measured_on"] >= 16
    data, _, _ = decode_split_part(trained, "test")
    views = data.pixels.numpy()[:60, 0]  # the test faces as the model was evaluated on them
    classifier = load_classifier(bundle, "fp32")
    direct = classifier.probabilities(np.repeat(views[:, None], 3, 1).astype(np.float32) / 255).argmax(1)
    detect = face_detector("haar", max_width=320)
    agreement = {}
    for name, crop_margin in (("measured", margin), ("fixed 10%", 0.1)):
        classifier.margin = crop_margin
        same = []
        for view, label in zip(views, direct):
            frame = np.full((480, 640, 3), 96, np.uint8)
            frame[90:390, 170:470] = _padded(view, 200, 50)  # as `emoshield data video` shows a face
            boxes = detect(frame)
            assert boxes, "every test face is found in its frame"
            same.append(classifier.probabilities(classifier.face_tensor(frame, boxes[0])).argmax() == label)
        agreement[name] = float(np.mean(same))
    # an 8-epoch model (83% on these people): framing still moves a sixth of its labels (48 -> 200 -> 48 px,
    # box offsets); measured 83% vs 75% with the fixed margin (a weaker 40-faces-per-class model: 60% vs 42%)
    assert agreement["measured"] >= 0.75 and agreement["measured"] >= agreement["fixed 10%"] + 0.05, agreement


def test_tta_on_the_device_classifies_each_face_as_the_mean_over_its_views(bundle, data_root):
    """`device run --tta flip`: each face's probabilities are the mean of the classifier's on the
    face and on its mirror image (what `emoshield evaluate --tta flip` scores)."""
    from emoshield.device.recognizer import FrameAnalyzer, load_classifier
    from emoshield.errors import EmoshieldError

    classifier = load_classifier(bundle, "fp32")
    frame = cv2.imread(str(sorted((data_root / "jaffe").iterdir())[0]))
    plain = FrameAnalyzer(classifier, detect_every=1).analyze(0, 0.0, frame)
    flipped = FrameAnalyzer(classifier, detect_every=1, tta="flip").analyze(0, 0.0, frame)
    assert len(plain.faces) == len(flipped.faces) == 1 and plain.box == flipped.box
    face = classifier.face_tensor(frame, tuple(plain.box))
    expected = (classifier.probabilities(face) + classifier.probabilities(face[..., ::-1].copy())) / 2
    got = np.array([flipped.probabilities[c] for c in classifier.classes])
    assert np.allclose(got, expected[0], atol=1e-4) and not np.allclose(got, list(plain.probabilities.values()),
                                                                         atol=1e-3)
    # ten-crop: the mean over the ten views that `evaluate --tta tencrop` averages
    from emoshield.views import numpy_views

    tencrop = FrameAnalyzer(classifier, detect_every=1, tta="tencrop").analyze(0, 0.0, frame)
    expected = classifier.probabilities(numpy_views(face, "tencrop")).mean(0)
    got = np.array([tencrop.probabilities[c] for c in classifier.classes])
    assert tencrop.box == plain.box and np.allclose(got, expected, atol=1e-4)
    with pytest.raises(EmoshieldError, match="tta"):
        FrameAnalyzer(classifier, tta="ten-crop")


_TRUTH_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                               st.sampled_from(["frames", "faces", "box", "label", "slot", "x"]), inner, max_size=3),
                           max_leaves=10)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=40), _TRUTH_JSON.map(lambda v: json.dumps(v).encode()),
                 st.just(b"[" * 50_000), st.just(json.dumps({"frames": []}).encode()),
                 st.just(json.dumps({"frames": ["happy"], "faces": None}).encode()),
                 st.just(json.dumps({"frames": ["happy"], "faces": [[{"box": [1, 2, 3], "label": "sad", "slot": 0}]]}).encode())))
def test_any_truth_file_is_scored_or_refused_in_one_line(tmp_path_factory, content):
    """--truth is read before the run (a bad file found after it would lose the run's scores):
    whatever the file holds, load_truth gives a truth that scores without an exception, or one
    line naming the file."""
    from emoshield.device.recognizer import FaceResult, FrameResult
    from emoshield.device.run import load_truth, score_against_truth
    from emoshield.errors import EmoshieldError

    path = tmp_path_factory.mktemp("truth") / "v.mp4.labels.json"
    path.write_bytes(content)
    try:
        truth = load_truth(path)
    except EmoshieldError as error:
        assert "\n" not in str(error) and str(path) in str(error)
        return
    results = [FrameResult(frame=i, time=0.0, bundle_version=1,
                           faces=[FaceResult(track=1, box=[0, 0, 10, 10], label="happy", probabilities={})])
               for i in range(3)]
    scores = score_against_truth(results, truth)
    assert 0 <= scores["accuracy_all_frames"] <= 1


def test_a_bad_truth_file_stops_the_device_before_it_runs(bundle, keys, tmp_path):
    (tmp_path / "frames").mkdir()
    for truth in (tmp_path / "missing.json", tmp_path / "empty.json"):
        if truth.name == "empty.json":
            truth.write_text('{"frames": []}')
        proc = run("device", "run", "--source", tmp_path / "frames", "--bundle", bundle, "--pubkey",
                   keys / "public.key", "--truth", truth, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--truth" in proc.stderr, proc.stderr
