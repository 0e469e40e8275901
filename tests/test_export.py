"""torch.export: an exported program that holds our loss computes the loss and, backpropagated, the gradients
PyTorch's loss gives; the joint forward-backward graph (ExecuTorch's on-device training) holds them too.  Export
inlines an autograd.Function's forward and drops its backward, so before the custom-op way (traced.py) the
exported parameters' gradients were silently None."""

import pytest
import torch
import torch.nn.functional as F

import softmax_ce_ext
from softmax_ce_ext._ops import ops

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Head(torch.nn.Module):
    """A last layer and a loss: what a training program exports."""

    def __init__(self, loss, channels=7, classes=5, kdim=False):
        super().__init__()
        self.kdim = kdim
        self.proj = torch.nn.Conv2d(channels, classes, 1) if kdim else torch.nn.Linear(channels, classes)
        self.loss = loss

    def forward(self, x, t):
        return self.loss(self.proj(x), t)


# (loss keywords, kdim, why)
CASES = {
    "mean": (dict(), False, "the training default: train_loss with the mean's denominator"),
    "sum-smoothed": (dict(reduction="sum", label_smoothing=0.1), False, "a sum, the smoothing term's gradient"),
    "mean-weighted-ignored": (dict(weight="w", ignore_index=1), False, "the weighted denominator, ignored rows"),
    "none": (dict(reduction="none"), False, "row losses, the gradient from their stats (rows_and_stats' formula)"),
    "kdim-mean": (dict(label_smoothing=0.2), True, "a segmentation head: (N, C, H, W) logits"),
}


def _inputs(device, kdim):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((3, 7, 4, 2) if kdim else (6, 7), generator=g).to(device)
    t = torch.randint(0, 5, (3, 4, 2) if kdim else (6,), generator=g).to(device)
    t.view(-1)[0] = 1  # at least one target that ignore_index=1 skips
    return x, t


def _modules(device, kw, kdim):
    if kw.get("weight") == "w":
        kw = {**kw, "weight": torch.rand(5, generator=torch.Generator().manual_seed(1)).to(device) + 0.5}
    ours = Head(softmax_ce_ext.CrossEntropyLoss(**kw), kdim=kdim).to(device)
    theirs = Head(torch.nn.CrossEntropyLoss(**kw), kdim=kdim).to(device)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize("case", list(CASES))
def test_exported_program_backpropagates(device, case):
    kw, kdim, _ = CASES[case]
    ours, theirs = _modules(device, kw, kdim)
    x, t = _inputs(device, kdim)
    _trains_like_torch(torch.export.export(ours, (x, t)).module(), theirs, x, t)


def _trains_like_torch(program, theirs, x, t):
    """The program's loss and, backpropagated with a random upstream gradient, its parameters' gradients equal
    PyTorch's module's."""
    loss, expected = program(x, t), theirs(x, t)
    torch.testing.assert_close(loss, expected)
    upstream = torch.rand_like(expected) + 0.5  # 'none': any upstream gradient; mean/sum: a scale
    loss.backward(upstream)
    expected.backward(upstream)
    for (name, p), q in zip(program.named_parameters(), theirs.parameters()):
        assert p.grad is not None, f"{name}: no gradient through the exported program"
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_exported_graph_holds_the_custom_ops(device):
    """The training pass is exported as train_loss (with its autograd formula), not the Function's raw op."""
    ours, _ = _modules(device, dict(), False)
    x, t = _inputs(device, False)
    targets = {str(n.target) for n in torch.export.export(ours, (x, t)).graph.nodes if n.op == "call_function"}
    assert "softmax_ce_ext.train_loss.default" in targets
    assert not any("mean_forward_backward" in n for n in targets)


@pytest.mark.parametrize("case", ["mean", "sum-smoothed", "kdim-mean"])
def test_joint_forward_backward_graph(device, case):
    """The joint graph (torch.export.experimental._export_forward_backward, ExecuTorch's training export): the loss
    and every parameter's gradient, equal to PyTorch's."""
    experimental = pytest.importorskip("torch.export.experimental")
    if not hasattr(experimental, "_export_forward_backward"):
        pytest.skip("this torch has no _export_forward_backward")
    kw, kdim, _ = CASES[case]
    ours, theirs = _modules(device, kw, kdim)
    x, t = _inputs(device, kdim)
    joint = experimental._export_forward_backward(torch.export.export(ours, (x, t)))
    params = [p.detach() for p in ours.parameters()]
    loss, *grads = joint.graph_module(*params, x, t)
    expected = theirs(x, t)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    assert len(grads) == len(params)
    for g, q in zip(grads, theirs.parameters()):
        torch.testing.assert_close(g, q.grad)


@pytest.mark.parametrize("case", ["mean", "sum-smoothed", "none", "kdim-mean"])
def test_export_without_gradient_can_be_trained(device, case):
    """Exported under no_grad (inference): the program computes the loss without a gradient pass (the rows'
    losses), and a program trained later still gets PyTorch's gradients (rows_and_stats carries its formula; PyTorch's
    own loss exports as differentiable ATen ops)."""
    kw, kdim, _ = CASES[case]
    ours, theirs = _modules(device, kw, kdim)
    x, t = _inputs(device, kdim)
    with torch.no_grad():
        ep = torch.export.export(ours, (x, t))
        torch.testing.assert_close(ep.module()(x, t), theirs(x, t))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "softmax_ce_ext.rows_and_stats.default" in targets
    assert not any("train_loss" in n or "backward" in n for n in targets)
    _trains_like_torch(ep.module(), theirs, x, t)


def test_export_refuses_what_it_would_drop(device):
    """Gradients only the Function has (probability targets that require grad; the Function called directly) would
    be missing from the exported program: refused with a message, not exported wrong."""
    x = torch.randn(4, 5, device=device, requires_grad=True)
    y = torch.softmax(torch.randn(4, 5, device=device), 1).requires_grad_()

    class SoftTargets(torch.nn.Module):
        def forward(self, x, y):
            return softmax_ce_ext.cross_entropy(x * 1, y)

    class Direct(torch.nn.Module):
        def forward(self, x, t):
            return softmax_ce_ext.SoftmaxCrossEntropyFunction.apply(x * 1, t)

    with pytest.raises(RuntimeError, match="probability targets or a class weight that require grad"):
        torch.export.export(SoftTargets(), (x, y))
    with pytest.raises(RuntimeError, match="SoftmaxCrossEntropyFunction itself"):
        torch.export.export(Direct(), (x, y.argmax(1)))
    # Probability targets that do not require grad take the exported way.
    program = torch.export.export(SoftTargets(), (x, y.detach())).module()
    xa, xb = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    program(xa, y.detach()).backward()
    F.cross_entropy(xb * 1, y.detach()).backward()
    torch.testing.assert_close(xa.grad, xb.grad)


def test_eager_calls_never_take_the_exported_way(device, monkeypatch):
    """Outside export (and outside compile under custom_op) the Function runs: the one-op training pass."""
    calls = []
    real = ops.mean_forward_backward
    monkeypatch.setattr(ops, "mean_forward_backward", lambda *a: calls.append(1) or real(*a), raising=False)
    x = torch.randn(4, 5, device=device, requires_grad=True)
    softmax_ce_ext.cross_entropy(x, torch.tensor([0, 1, 2, 3], device=device)).backward()
    assert calls
