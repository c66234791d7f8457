import pytest
import torch
import torch.nn.functional as F

from emoshield.attacks import APGD, FGSM, PGD, RFGSM, corrupt, parse_eps_list, worst_case_correct
from emoshield.attacks.apgd import apgd_checkpoints
from emoshield.attacks.corruptions import CORRUPTIONS
from emoshield.errors import EmoshieldError
from emoshield.models import ModelConfig, build_model

EPS = 0.03


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.Dropout(0.2),
        torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 4))


def batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g), torch.randint(0, 4, (n,), generator=g)


ALL = [lambda: FGSM(EPS), lambda: RFGSM(EPS), lambda: PGD(EPS, steps=5), lambda: PGD(EPS, steps=3, restarts=2),
       lambda: APGD(EPS, steps=10)]
IDS = ["fgsm", "rfgsm", "pgd", "pgd-restarts", "apgd"]


@pytest.mark.parametrize("make", ALL, ids=IDS)
def test_attack_invariants(make):
    model = tiny_model()
    model.train()  # the caller's mode must come back
    model[0].weight.requires_grad_(False)  # and so must a mix of frozen/trainable parameters
    x, y = batch()
    x_before = x.clone()
    with torch.no_grad():  # attacks must work inside a caller's no_grad
        x_adv = make()(model, x, y)
    assert torch.equal(x, x_before), "x was modified"
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad and x_adv.shape == x.shape
    assert (x_adv - x).abs().max() > EPS / 4, "attack did nothing"
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == [False] + [True] * (len(list(model.parameters())) - 1)
    assert all(p.grad is None for p in model.parameters()), "attacks must not leave weight gradients"


@pytest.mark.parametrize("make", ALL, ids=IDS)
def test_batch_slice_gives_same_result(make):
    model = tiny_model().eval()
    x, y = batch(16)
    full = make()(model, x, y)
    part = make()(model, x[:6], y[:6])
    assert torch.allclose(full[:6], part, atol=1e-6)


def test_attacks_work_in_inference_mode_and_eval_mode_is_default():
    model = tiny_model().train()
    x, y = batch()
    with torch.inference_mode():
        x_inf = x.clone()
    a = FGSM(EPS)(model, x_inf, y)  # an inference tensor from the caller
    b = FGSM(EPS)(model, x, y)
    assert torch.equal(a, b)
    model.eval()
    c = FGSM(EPS, mode="keep")(model, x, y)
    assert torch.equal(b, c), "default mode is eval: dropout and BatchNorm statistics fixed"


def test_fgsm_and_rfgsm_follow_their_formulas():
    model = tiny_model().eval()
    x, y = batch()
    xg = x.clone().requires_grad_(True)
    F.cross_entropy(model(xg), y).backward()
    assert torch.equal(FGSM(EPS)(model, x, y), (x + EPS * xg.grad.sign()).clamp(0, 1))
    alpha = EPS / 2
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    x_tilde = (x + alpha * noise.sign()).requires_grad_(True)  # not clipped, as SPEC §5 writes it
    F.cross_entropy(model(x_tilde), y).backward()
    expected = (x_tilde.detach() + (EPS - alpha) * x_tilde.grad.sign()).clamp(0, 1)
    assert torch.allclose(RFGSM(EPS, seed=7)(model, x, y), expected, atol=1e-7)
    with pytest.raises(EmoshieldError, match="eps > alpha"):
        RFGSM(0.01, alpha=0.01)


def test_fgsm_and_pgd_match_torchattacks():
    import torchattacks  # make setup installs it: a missing reference fails, it never skips
    model = tiny_model().eval()
    x, y = batch(32)
    ours = FGSM(EPS)(model, x, y)
    theirs = torchattacks.FGSM(model, eps=EPS)(x, y)
    assert (ours - theirs).abs().max() <= 1e-5
    ours = PGD(EPS, steps=10, random_start=False)(model, x, y)
    theirs = torchattacks.PGD(model, eps=EPS, alpha=2.5 * EPS / 10, steps=10, random_start=False)(x, y)
    assert (ours - theirs).abs().max() <= 1e-5


def test_apgd_checkpoints_follow_the_paper():
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 -> ceil(p * 100)
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


@pytest.fixture(scope="module")
def trained(data_root):
    """A small model trained on real CK+48 faces (3 classes), with its test tensors."""
    from tests.conftest import small_trained_model

    return small_trained_model(data_root, "happy,surprise,disgust", 12, 128)


def test_stronger_attacks_hurt_more_on_a_trained_model(trained):
    model, x, y = trained
    eps = 0.01
    correct = worst_case_correct(model, x, y, [FGSM(eps), PGD(eps), APGD(eps, steps=20)])
    acc = {k.split("(")[0]: v.float().mean().item() for k, v in correct.items()}
    assert acc["clean"] > 0.6
    assert acc["clean"] >= acc["FGSM"] >= acc["PGD"]
    assert acc["APGD"] <= acc["PGD"] + 0.03
    assert acc["worst_case"] <= min(acc["FGSM"], acc["PGD"], acc["APGD"])
    worst = correct["clean"] & correct[next(k for k in correct if k.startswith("FGSM"))]
    for key in correct:
        if key.startswith(("PGD", "APGD")):
            worst &= correct[key]
    assert torch.equal(worst, correct["worst_case"])


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruptions_are_deterministic_in_range_and_grow_with_severity(name):
    # a structured mid-range image (4-pixel checkerboard + noise) so every corruption has room to act
    rows = torch.arange(16).view(-1, 1) // 4
    board = ((rows + rows.T) % 2).float().expand(4, 3, 16, 16)
    x = board * 0.5 + 0.25 + 0.05 * batch(4)[0]
    outs = [corrupt(x, name, s, seed=3) for s in range(1, 6)]
    assert torch.equal(outs[2], corrupt(x, name, 3, seed=3))
    distances = [(o - x).abs().mean().item() for o in outs]
    assert all(0 <= o.min() and o.max() <= 1 and o.shape == x.shape for o in outs)
    assert distances[0] > 0 and distances[-1] > distances[0]


def test_eps_lists():
    assert parse_eps_list("0:0.03:0.01") == [0.0, 0.01, 0.02, 0.03]
    assert parse_eps_list("0.005,0.01") == [0.005, 0.01]
    for bad in ("a,b", "nan", "0.01,nan", "inf", "-0.01", "1.5", "", ",", "0:1:1e-12", "0:1:0", "0:nan:0.1",
                "0:1e400:1", "1:0:0.1", "0.01:0.02"):
        with pytest.raises(EmoshieldError):  # a one-line error, never a hang on a billion values
            parse_eps_list(bad)


def test_eval_graph_is_the_same_function_and_the_fast_path_the_same_attack():
    from emoshield.attacks.base import attack_context, eval_graph

    model = build_model(ModelConfig("mobilenet_v2", ["a", "b", "c", "d"], 32))
    with torch.no_grad():  # give BatchNorm non-trivial statistics, so folding has work to do
        model.train()
        for _ in range(3):
            model(torch.rand(16, 3, 32, 32))
    model.eval()
    x, y = torch.rand(24, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.randint(0, 4, (24,))
    with attack_context(model, "eval"):
        fast = eval_graph(model)
        norms = [n for n, m in fast.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert norms == ["inner.head.norm"], norms  # all 52 after a convolution are folded; the head's follows pooling
        assert torch.allclose(fast(x), model(x), atol=1e-4)
    for make in (lambda fast: FGSM(EPS, fast=fast), lambda fast: PGD(EPS, steps=3, fast=fast)):
        a, b = make(True)(model, x, y), make(False)(model, x, y)
        assert a.is_contiguous() and (a - x).abs().max() <= EPS + 1e-6
        # sign(gradient) may flip where the gradient is ~0 (float rounding): allow a tiny share
        assert ((a - b).abs() <= 1e-5).float().mean() >= 0.999
    # a model torch.fx cannot trace is attacked as it is
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_model()

        def forward(self, x):
            return self.net(x) if x.sum() > 0 else -self.net(x)

    branchy = Branchy().eval()
    with attack_context(branchy, "eval"):
        assert eval_graph(branchy) is branchy
    x, y = batch()
    assert torch.equal(FGSM(EPS)(branchy, x, y), FGSM(EPS, fast=False)(branchy, x, y))


def test_eval_graph_is_cached_and_refreshed_when_the_model_changes():
    import gc

    from emoshield.attacks import folding
    from emoshield.attacks.base import attack_context

    model = tiny_model()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model.train()
        model(torch.rand(32, 3, 16, 16))
    model.eval()
    x, y = batch(64)
    with attack_context(model, "eval"):
        graph = folding.eval_graph(model)
        assert graph is not model and folding.eval_graph(model) is graph  # unchanged model: reused
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in graph.modules())
    # an optimizer step (foreach kernels), a state load and BatchNorm statistics each change the function
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, foreach=True)
    other = tiny_model(seed=1).state_dict()

    def sgd_step():
        model.train()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    def train_mode_forward():
        model.train()
        with torch.no_grad():
            model(x + 0.5)

    for change in (sgd_step, lambda: model.load_state_dict(other), train_mode_forward):
        change()
        model.eval()
        with attack_context(model, "eval"):
            assert not torch.allclose(graph(x), model(x), atol=1e-3)  # stale until the next call
            assert folding.eval_graph(model) is graph  # same structure: refreshed in place
            assert torch.allclose(graph(x), model(x), atol=1e-5)
            rebuilt = folding.FoldedModel(model)  # the refresh equals a fresh fold, bit for bit
            assert torch.equal(rebuilt(x), graph(x))
    # the attacks see the current model through the cache
    a, b = PGD(EPS, steps=3)(model, x, y), PGD(EPS, steps=3, fast=False)(model, x, y)
    assert ((a - b).abs() <= 1e-5).float().mean() >= 0.999
    # a replaced layer is a new structure: a new copy
    model[3] = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
    with attack_context(model, "eval"):
        assert folding.eval_graph(model) is not graph
        assert torch.allclose(folding.eval_graph(model)(x), model(x), atol=1e-5)
    # an attack too small to repay building a copy runs the module as is, and caches nothing
    small = tiny_model(seed=2).eval()
    with attack_context(small, "eval"):
        assert folding.eval_graph(small, gradient_images=8) is small
    assert small not in folding._CACHE
    assert torch.equal(FGSM(EPS)(small, x[:8], y[:8]), FGSM(EPS, fast=False)(small, x[:8], y[:8]))
    # a cached copy does not keep its model alive
    entries = len(folding._CACHE)
    del model, optimizer, graph, rebuilt
    gc.collect()
    assert len(folding._CACHE) == entries - 1


def test_a_model_made_under_inference_mode_is_refused_clearly_and_left_as_it_was():
    with torch.inference_mode():
        model = tiny_model()
    x, y = batch()
    with pytest.raises(EmoshieldError, match="inference tensors"):
        FGSM(EPS)(model, x, y)
    assert all(p.requires_grad for p in model.parameters()) and model.training


def test_attacks_give_back_each_submodules_own_mode():
    model = tiny_model()
    model.train()
    model[1].eval()  # frozen BatchNorm inside a training model, as fine-tuning recipes do
    x, y = batch()
    for make in ALL:
        make()(model, x, y)
        assert model.training and model[0].training and model[-1].training and not model[1].training


def test_folding_leaves_shared_convolutions_alone():
    from emoshield.attacks.folding import FoldedModel

    class Shared(torch.nn.Module):  # one convolution used twice, once before a BatchNorm
        def __init__(self):
            super().__init__()
            self.conv, self.norm = torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.BatchNorm2d(3)

        def forward(self, x):
            return self.norm(self.conv(x)) + self.conv(x)

    model = Shared()
    with torch.no_grad():
        model(torch.rand(8, 3, 8, 8))  # running statistics away from 0 / 1
    model.eval()
    folded = FoldedModel(model)
    x = torch.rand(4, 3, 8, 8)
    assert folded.pairs == [] and torch.allclose(folded(x), model(x), atol=1e-6)


@pytest.mark.parametrize("make", [lambda: RFGSM(EPS), lambda: PGD(EPS, steps=3)], ids=["rfgsm", "pgd"])
def test_sharded_random_starts_give_each_rank_the_rows_one_process_would(make):
    """Under torchrun each rank attacks its strided shard of the global batch with the same seed:
    its random start must be its rows of the global batch's start, not a fresh draw."""
    model = tiny_model().eval()
    x, y = batch(16)
    whole = make()(model, x, y)
    for rank in range(2):
        attack = make()
        attack.shard = (rank, 2, 16)
        assert torch.allclose(attack(model, x[rank::2], y[rank::2]), whole[rank::2], atol=1e-6)
        unsharded = make()(model, x[rank::2], y[rank::2])
        if rank == 1:  # what every rank did before: the first rows' noise, wrong for rank 1
            assert not torch.allclose(unsharded, whole[1::2], atol=1e-6)
