"""SAR, EATA, TBR and RBN: one update on a fixed tiny model and batch against the papers' equations, computed
here by hand (BN written out, SAM's ascent, SGD with momentum, the selection rules), not by the code under test."""

import math

import pytest
import torch
from torch import nn

from repro.adapt import create_method
from repro.errors import UserError

torch.set_num_threads(1)

EPS = 1e-5
CLASSES = 5


def tiny_model(seed: int = 0) -> nn.Module:
    """conv → BN → ReLU → pool → linear, with confident enough logits that entropy filters keep some images."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, CLASSES))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.2, 0.8, 1.0, 1.5]))
        model[1].bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        model[1].running_mean.copy_(torch.tensor([0.2, -0.1, 0.0, 0.3]))
        model[1].running_var.copy_(torch.tensor([0.5, 1.5, 1.0, 2.0]))
        model[5].weight.mul_(6.0)
    return model.eval()


def batch(n: int = 12, seed: int = 1) -> torch.Tensor:
    return 1.3 * torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed)) + 0.4


def by_hand(model: nn.Module, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The model's logits with its BN written out on the batch's statistics (biased variance)."""
    h = model[0](x)
    mean = h.mean(dim=(0, 2, 3), keepdim=True)
    var = ((h - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    h = (h - mean) / torch.sqrt(var + EPS) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
    return model[5](h.relu().mean(dim=(2, 3)))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    p = logits.softmax(1)
    return -(p * p.log()).sum(1)


def learned(method) -> tuple[torch.Tensor, torch.Tensor]:
    layer = method.model[1].layer
    return layer.weight.detach(), layer.bias.detach()


def sar_gradient(model: nn.Module, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, rho: float,
                 margin: float):
    """SAR's two passes by hand at (γ, β): the logits, the images reliable in each pass, the loss at the ascended
    point and its gradient, the one SGD applies."""
    gamma, beta = gamma.detach().clone().requires_grad_(True), beta.detach().clone().requires_grad_(True)
    logits = by_hand(model, x, gamma, beta)
    e = entropy(logits)
    reliable = e.detach() < margin
    g_gamma, g_beta = torch.autograd.grad(e[reliable].mean(), [gamma, beta])
    norm = torch.sqrt((g_gamma ** 2).sum() + (g_beta ** 2).sum())
    gamma2 = (gamma.detach() + rho * g_gamma / (norm + 1e-12)).requires_grad_(True)
    beta2 = (beta.detach() + rho * g_beta / (norm + 1e-12)).requires_grad_(True)
    e2 = entropy(by_hand(model, x, gamma2, beta2))
    keep = reliable & (e2.detach() < margin)
    loss = e2[keep].mean()
    return logits.detach(), reliable, keep, loss.item(), torch.autograd.grad(loss, [gamma2, beta2])


def test_sar_one_update_follows_the_equations():
    model, x = tiny_model(), batch()
    lr, rho, fraction = 0.05, 0.1, 0.7
    sar = create_method("sar", model, lr=lr, rho=rho, margin=fraction)
    logits, reliable, keep, loss, (h_gamma, h_beta) = sar_gradient(
        model, x, model[1].weight, model[1].bias, rho, fraction * math.log(CLASSES))
    assert 0 < reliable.sum() < len(x)  # the filter matters on this batch
    assert 0 < keep.sum() < reliable.sum()  # the second filter matters too
    # SGD with momentum 0.9, first step: the buffer is the gradient itself
    expected_gamma, expected_beta = model[1].weight - lr * h_gamma, model[1].bias - lr * h_beta

    returned = sar.predict(x)
    torch.testing.assert_close(returned, logits, rtol=1e-5, atol=1e-5)
    got_gamma, got_beta = learned(sar)
    torch.testing.assert_close(got_gamma, expected_gamma.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_beta, expected_beta.detach(), rtol=1e-5, atol=1e-6)
    assert sar.entropy_average == pytest.approx(loss, rel=1e-5)
    assert (sar.forward_images, sar.backward_images) == (2 * len(x), 2 * len(x))


def sar_replay(model: nn.Module, batches: list[torch.Tensor], *, lr: float, official: bool, episodic: bool = False,
               rho: float = 0.05, fraction: float = 0.4, reset_below: float = 0.2) -> list[tuple]:
    """SAR over a stream by hand (γ, β, average and whether the model was reset, after each batch), resetting as
    mr-eggplant/SAR does when ``official``: a reset restores γ, β but keeps SGD's momentum (SAM.load_state_dict
    leaves the wrapped optimizer alone) and, after a recovery, the average (SAR.forward stores it back).
    Otherwise both are cleared at every reset."""
    gamma0, beta0 = model[1].weight.detach().clone(), model[1].bias.detach().clone()
    gamma, beta, buffers, average, states = gamma0, beta0, None, None, []
    for x in batches:
        if episodic:
            gamma, beta, average = gamma0, beta0, None
            buffers = buffers if official else None
        _, _, keep, loss, grads = sar_gradient(model, x, gamma, beta, rho, fraction * math.log(CLASSES))
        assert keep.any()  # the replay needs a loss on every batch
        buffers = list(grads) if buffers is None else [0.9 * m + g for m, g in zip(buffers, grads, strict=True)]
        gamma, beta = gamma - lr * buffers[0], beta - lr * buffers[1]
        average = loss if average is None else 0.9 * average + 0.1 * loss
        reset = average < reset_below
        if reset:
            gamma, beta = gamma0, beta0
            if not official:
                buffers, average = None, None
        states.append((gamma, beta, average, reset))
    return states


def test_sar_recovery_keeps_the_average_and_the_momentum_as_the_official_code():
    model = tiny_model()
    with torch.no_grad():
        model[5].weight.mul_(5.0)  # confident: the average entropy falls below 0.2 on the first batch
    stream = [batch(6, seed) for seed in (7, 1, 5)]
    official, clean = (sar_replay(model, stream, lr=0.05, official=keep) for keep in (True, False))
    # official: reset after the first batch, and again after the second although its own loss is above 0.2,
    # because the average stays below; clean: only the first; the momentum then moves the third step
    assert [state[3] for state in official] == [True, True, False]
    assert [state[3] for state in clean] == [True, False, False]
    assert official[1][2] < 0.2 < clean[1][2]
    assert not torch.allclose(official[2][0], clean[2][0])
    for recovery, expected in (("official", official), ("clean", clean)):
        sar = create_method("sar", model, lr=0.05, recovery=recovery)
        for x, (gamma, beta, average, _) in zip(stream, expected, strict=True):
            sar.predict(x)
            torch.testing.assert_close(learned(sar), (gamma, beta), rtol=1e-5, atol=1e-6)
            assert sar.entropy_average == (None if average is None else pytest.approx(average, rel=1e-5))
    with pytest.raises(UserError, match="recovery"):
        create_method("sar", model, recovery="paper")


def test_sar_episodic_reset_keeps_the_momentum_as_the_official_code():
    model, stream = tiny_model(), [batch(12, seed) for seed in (1, 2)]
    official, clean = (sar_replay(model, stream, lr=0.05, official=keep, episodic=True, fraction=0.7)
                       for keep in (True, False))
    assert not any(state[3] for state in official + clean)  # no recovery: the episodic reset alone
    assert not torch.allclose(official[1][0], clean[1][0])  # the first batch's momentum moves the second step
    for recovery, expected in (("official", official), ("clean", clean)):
        sar = create_method("sar", model, lr=0.05, margin=0.7, recovery=recovery, episodic=True)
        for x, (gamma, beta, average, _) in zip(stream, expected, strict=True):
            sar.predict(x)
            torch.testing.assert_close(learned(sar), (gamma, beta), rtol=1e-5, atol=1e-6)
            assert sar.entropy_average == pytest.approx(average, rel=1e-5)


@pytest.mark.parametrize("recovery", ["official", "clean"])
def test_sar_lr_is_set_once_per_stream(recovery):
    """main.py derives lr from the configured batch size once: a short batch after a recovery keeps it."""
    from repro.adapt.sar import official_lr

    sar = create_method("sar", tiny_model(), margin=0.9, reset_below=10.0, recovery=recovery)  # always recovers
    for n in (8, 8, 3):
        sar.predict(batch(n))
        assert sar.optimizer.param_groups[0]["lr"] == official_lr(8)
    sar.reset()  # a new stream: its first batch sets lr again
    sar.predict(batch(3))
    assert sar.optimizer.param_groups[0]["lr"] == official_lr(3)


def test_sar_lr_rule_and_models_with_nothing_to_adapt():
    from repro.adapt.sar import official_lr

    assert official_lr(64) == 0.00025 and official_lr(16) == pytest.approx(0.00025 * 2 * 16 / 64)
    assert official_lr(1) == pytest.approx(2 * 0.00025 * 2 / 64)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    x = batch()
    for name in ("sar", "eata", "tbr", "rbn"):
        method = create_method(name, plain)
        assert not method.adapts
        with torch.no_grad():
            torch.testing.assert_close(method.predict(x), plain(x))
    # GroupNorm γ, β are learned by SAR (norm_layers="all", its default) but not by EATA (BN only, its code)
    gn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                       nn.Linear(4, 5))
    assert create_method("sar", gn).adapted_layers == ["1"] and not create_method("eata", gn).adapts
    assert create_method("eata", gn, norm_layers="all").adapts


def test_eata_two_updates_follow_the_equations():
    model, clean, x1, x2 = tiny_model(), batch(seed=5), batch(seed=1), batch(seed=2)
    lr, fraction, redundancy, alpha = 0.05, 0.7, 0.995, 50.0
    eata = create_method("eata", model, lr=lr, margin=fraction, redundancy=redundancy, fisher_alpha=alpha)
    eata.calibrate([clean[:6], clean[6:]])
    margin = fraction * math.log(CLASSES)

    gamma0 = model[1].weight.detach().clone()
    beta0 = model[1].bias.detach().clone()
    fisher = [torch.zeros(4), torch.zeros(4)]
    for part in (clean[:6], clean[6:]):
        g, b = gamma0.clone().requires_grad_(True), beta0.clone().requires_grad_(True)
        out = by_hand(model, part, g, b)
        loss = -out.log_softmax(1).gather(1, out.argmax(1, keepdim=True)).mean()
        grads = torch.autograd.grad(loss, [g, b])
        fisher = [f + gr ** 2 for f, gr in zip(fisher, grads, strict=True)]
    fisher = [f / 2 for f in fisher]

    gamma, beta, buffers, average = gamma0.clone(), beta0.clone(), None, None
    counts = []
    for x in (x1, x2):
        g, b = gamma.clone().requires_grad_(True), beta.clone().requires_grad_(True)
        logits = by_hand(model, x, g, b)
        e = entropy(logits)
        probs = logits.detach().softmax(1)
        keep = e.detach() < margin
        if average is not None:
            cosine = (probs @ average) / (probs.norm(dim=1) * average.norm())
            keep = keep & (cosine.abs() < redundancy)
        counts.append(int(keep.sum()))
        if keep.any():
            mean = probs[keep].mean(0)
            average = mean if average is None else 0.9 * average + 0.1 * mean
        weights = 1 / torch.exp(e.detach() - margin)
        loss = (e * weights)[keep].mean()
        loss = loss + alpha * ((fisher[0] * (g - gamma0) ** 2).sum() + (fisher[1] * (b - beta0) ** 2).sum())
        grads = torch.autograd.grad(loss, [g, b])
        buffers = list(grads) if buffers is None else [0.9 * m + gr for m, gr in zip(buffers, grads, strict=True)]
        gamma, beta = gamma - lr * buffers[0], beta - lr * buffers[1]
        returned = eata.predict(x)
        torch.testing.assert_close(returned, logits.detach(), rtol=1e-5, atol=1e-5)
    assert 0 < counts[1] < len(x2) and counts[0] > 0  # both filters matter on the second batch
    got_gamma, got_beta = learned(eata)
    torch.testing.assert_close(got_gamma, gamma.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_beta, beta.detach(), rtol=1e-5, atol=1e-6)


def single_bn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, 0.5, 1.0]))
        bn.bias.copy_(torch.tensor([0.2, -0.3, 0.0]))
        bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
        bn.running_var.copy_(torch.tensor([0.8, 1.2, 2.0]))
    return nn.Sequential(bn).eval()


def statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(dim=(0, 2, 3))
    return mean, ((x - mean.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))


def affine(z: torch.Tensor, model: nn.Module) -> torch.Tensor:
    return z * model[0].weight.detach().view(1, -1, 1, 1) + model[0].bias.detach().view(1, -1, 1, 1)


def per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def test_rbn_updates_global_statistics_then_normalizes_with_them():
    model, alpha = single_bn(), 0.2
    rbn = create_method("rbn", model, momentum=alpha)
    mean, var = model[0].running_mean.clone(), model[0].running_var.clone()
    for n, seed in [(4, 1), (1, 2), (7, 3)]:
        x = batch(n, seed)
        batch_mean, batch_var = statistics(x)
        mean, var = (1 - alpha) * mean + alpha * batch_mean, (1 - alpha) * var + alpha * batch_var
        expected = affine((x - per_channel(mean)) / torch.sqrt(per_channel(var) + EPS), model)
        torch.testing.assert_close(rbn.predict(x), expected, rtol=1e-5, atol=1e-6)
    frozen = batch(5, 9)
    expected = affine((frozen - per_channel(mean)) / torch.sqrt(per_channel(var) + EPS), model)
    torch.testing.assert_close(rbn.predict_frozen(frozen), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rbn.predict_frozen(frozen), expected, rtol=1e-5, atol=1e-6)  # unchanged state
    rbn.reset()
    x = batch(4, 1)
    first_mean, first_var = statistics(x)
    start_mean = (1 - alpha) * model[0].running_mean + alpha * first_mean
    start_var = (1 - alpha) * model[0].running_var + alpha * first_var
    expected = affine((x - per_channel(start_mean)) / torch.sqrt(per_channel(start_var) + EPS), model)
    torch.testing.assert_close(rbn.predict(x), expected, rtol=1e-5, atol=1e-6)


def test_tbr_renormalizes_with_the_averages_of_earlier_batches():
    model, alpha = single_bn(), 0.7
    tbr = create_method("tbr", model, momentum=alpha)
    ema_mean = ema_std = None
    for n, seed in [(4, 1), (6, 2), (3, 3)]:
        x = batch(n, seed)
        mean, var = statistics(x)
        std = torch.sqrt(var + EPS)
        if ema_mean is None:
            ema_mean, ema_std = mean, std
        r, d = std / ema_std, (mean - ema_mean) / ema_std
        expected = affine((x - per_channel(mean)) / per_channel(std) * per_channel(r) + per_channel(d), model)
        torch.testing.assert_close(tbr.predict(x), expected, rtol=1e-5, atol=1e-6)
        ema_mean, ema_std = alpha * ema_mean + (1 - alpha) * mean, alpha * ema_std + (1 - alpha) * std
    frozen = batch(5, 9)
    expected = affine((frozen - per_channel(ema_mean)) / per_channel(ema_std), model)
    torch.testing.assert_close(tbr.predict_frozen(frozen), expected, rtol=1e-5, atol=1e-5)
    tbr.reset()  # the first batch after a reset is normalized with its own statistics again
    x = batch(4, 1)
    mean, var = statistics(x)
    torch.testing.assert_close(tbr.predict(x), affine((x - per_channel(mean)) / torch.sqrt(per_channel(var) + EPS),
                                                      model), rtol=1e-5, atol=1e-6)


def test_sar_adapts_groupnorm_and_layernorm_at_batch_size_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.LayerNorm(4), nn.Linear(4, CLASSES)).eval()
    with torch.no_grad():
        model[6].weight.mul_(6.0)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    sar = create_method("sar", model, lr=0.5, margin=0.9)
    assert sar.adapted_layers == ["1", "5"]
    before = [p.detach().clone() for p in sar.learned]
    frozen = sar.predict_frozen(batch(1))
    assert all(torch.equal(a, b) for a, b in zip(before, sar.learned, strict=True))  # predicting frozen: no step
    with torch.no_grad():
        torch.testing.assert_close(frozen, model(batch(1)))
    for seed in range(4):
        sar.predict(batch(1, seed))
    assert any(not torch.equal(a, b) for a, b in zip(before, sar.learned, strict=True))
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())  # the caller's model is untouched
