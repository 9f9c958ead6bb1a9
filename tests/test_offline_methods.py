"""Offline method breadth: KTO / IPO / CoPG losses against independent scalar computations and
gradient directions; the data variants (dual captions, TPO pairs, unpaired KTO, rewards); InPO
inversion against hand-written DDIM / Euler steps. Fast: no training here."""

import math
from collections import Counter

import pyarrow.parquet as pq
import pytest
import torch

from diffalign.config import ConfigError, load_config
from diffalign.data.toy import make_toy_pickapic_rows, pickapic_table
from diffalign.data.variants import (
    CaptionPairStream, DualCaptionPairStream, RewardPairStream, UnpairedStream, VariantDataOptions,
    collate_variant, load_rows, perturb_caption, write_toy_captions,
)
from diffalign.losses import diffusion_copg_loss, diffusion_dpo_loss, diffusion_ipo_loss, diffusion_kto_loss
from diffalign.models import FAMILIES
from diffalign.trainers.inversion import (
    ddim_inversion_step, ddim_invert, flow_invert, implied_eps, inversion_grid, inverted_input_and_target,
)


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------------------- KTO
def test_kto_matches_scalar_formula():
    g = torch.Generator().manual_seed(0)
    md, rd = torch.rand(3, generator=g), torch.rand(3, generator=g)
    mu, ru = torch.rand(2, generator=g), torch.rand(2, generator=g)
    beta, ld, lu = 7.0, 1.3, 0.7
    loss, m = diffusion_kto_loss(md, mu, rd, ru, beta, ld, lu)
    r_d = [-(md[i] - rd[i]).item() for i in range(3)]
    r_u = [-(mu[i] - ru[i]).item() for i in range(2)]
    z = max(0.0, sum(r_d + r_u) / 5)
    per = [ld * (1 - _sig(beta * (r - z))) for r in r_d] + [lu * (1 - _sig(beta * (z - r))) for r in r_u]
    assert loss.item() == pytest.approx(sum(per) / 5, rel=1e-5)
    assert m["kl"].item() == pytest.approx(z, abs=1e-7)
    right = [r > z for r in r_d] + [r < z for r in r_u]
    assert m["implicit_acc"].item() == pytest.approx(sum(right) / 5)


def test_kto_baseline_is_clamped_and_detached():
    # model worse than the reference everywhere -> mean(R - L) < 0 -> z = 0
    md, mu = torch.tensor([0.6, 0.7], requires_grad=True), torch.tensor([0.8], requires_grad=True)
    rd, ru = torch.tensor([0.5, 0.5]), torch.tensor([0.5])
    beta = 3.0
    loss, m = diffusion_kto_loss(md, mu, rd, ru, beta)
    assert m["kl"].item() == 0.0
    loss.backward()
    # d/dL_d of (1 - sigmoid(beta*(-(L-R) - z))) / n with z constant = beta*s*(1-s)/n
    for i in range(2):
        s = _sig(beta * (-(md[i] - rd[i]).item()))
        assert md.grad[i].item() == pytest.approx(beta * s * (1 - s) / 3, rel=1e-5)
    # with z > 0 the gradient is still the z-constant one (z detached)
    md2, mu2 = torch.tensor([0.1, 0.2], requires_grad=True), torch.tensor([0.3], requires_grad=True)
    loss2, m2 = diffusion_kto_loss(md2, mu2, rd, ru, beta)
    z = m2["kl"].item()
    assert z > 0
    loss2.backward()
    s = _sig(beta * (-(md2[0] - rd[0]).item() - z))
    assert md2.grad[0].item() == pytest.approx(beta * s * (1 - s) / 3, rel=1e-5)


def test_kto_gradient_lowers_desirable_raises_undesirable_error():
    md, mu = torch.tensor([0.5, 0.4], requires_grad=True), torch.tensor([0.5, 0.45], requires_grad=True)
    loss, _ = diffusion_kto_loss(md, mu, torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5]), beta=10.0)
    loss.backward()
    assert (md.grad > 0).all() and (mu.grad < 0).all()


def test_kto_one_sided_batch_and_metrics_finite():
    md = torch.tensor([0.4, 0.5])
    loss, m = diffusion_kto_loss(md, md[:0], md + 0.1, md[:0], beta=5.0)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in m.values())
    assert m["frac_desirable"].item() == 1.0 and m["mse_u"].item() == 0.0


# ---------------------------------------------------------------------------------- IPO / CoPG
def _h(lw, ll, rw, rl, beta):
    return -0.5 * beta * ((lw - ll) - (rw - rl))


def test_ipo_matches_scalar_formula():
    g = torch.Generator().manual_seed(2)
    lw, ll, rw, rl = (torch.rand(4, generator=g) for _ in range(4))
    beta, tau = 11.0, 0.25
    loss, m = diffusion_ipo_loss(lw, ll, rw, rl, beta, tau)
    per = [(_h(lw[i], ll[i], rw[i], rl[i], beta).item() - 1 / (2 * tau)) ** 2 for i in range(4)]
    assert loss.item() == pytest.approx(sum(per) / 4, rel=1e-5)
    assert m["target_margin"].item() == pytest.approx(2.0)
    # h is exactly Diffusion-DPO's "inside"
    _, dpo_m = diffusion_dpo_loss(lw, ll, rw, rl, beta)
    assert m["reward_margin"].item() == pytest.approx(dpo_m["reward_margin"].item(), rel=1e-6)


def test_ipo_gradient_direction_and_pull_back():
    ref = torch.tensor([0.5]), torch.tensor([0.5])
    lw, ll = torch.tensor([0.5], requires_grad=True), torch.tensor([0.5], requires_grad=True)
    diffusion_ipo_loss(lw, ll, *ref, beta=10.0, tau=1.0)[0].backward()
    assert lw.grad.item() > 0 and ll.grad.item() < 0  # below target: lower chosen, raise rejected error
    # overshoot: h = -5*(0.2 - 0.5 - 0) = 1.5 > 0.5 -> pushed back
    lw, ll = torch.tensor([0.2], requires_grad=True), torch.tensor([0.5], requires_grad=True)
    diffusion_ipo_loss(lw, ll, *ref, beta=10.0, tau=1.0)[0].backward()
    assert lw.grad.item() < 0 and ll.grad.item() > 0
    # at the target margin the loss is 0
    loss, _ = diffusion_ipo_loss(torch.tensor([0.4]), torch.tensor([0.5]), *ref, beta=10.0, tau=1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)


def test_copg_matches_scalar_formula_with_per_pair_rewards():
    g = torch.Generator().manual_seed(3)
    lw, ll, rw, rl = (torch.rand(3, generator=g) for _ in range(4))
    Rw, Rl = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([0.0, 0.5, -1.0])
    beta = 9.0
    loss, m = diffusion_copg_loss(lw, ll, rw, rl, Rw, Rl, beta)
    per = [0.5 * ((Rw[i] - Rl[i]).item() - _h(lw[i], ll[i], rw[i], rl[i], beta).item()) ** 2 for i in range(3)]
    assert loss.item() == pytest.approx(sum(per) / 3, rel=1e-5)
    assert m["reward_gap"].item() == pytest.approx(4.0 / 3)
    # constant reward gap: CoPG = IPO / 2 with target = gap (CoPG generalises IPO)
    ipo, _ = diffusion_ipo_loss(lw, ll, rw, rl, beta, tau=0.5)
    copg, _ = diffusion_copg_loss(lw, ll, rw, rl, 1.0, 0.0, beta)
    assert copg.item() == pytest.approx(ipo.item() / 2, rel=1e-6)


def test_copg_gradient_is_the_contrastive_policy_gradient():
    ref = torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5])
    lw, ll = torch.tensor([0.5, 0.5], requires_grad=True), torch.tensor([0.5, 0.5], requires_grad=True)
    beta = 4.0
    Rw, Rl = torch.tensor([1.0, 0.3]), torch.tensor([0.0, 0.3])  # second pair: a tie
    diffusion_copg_loss(lw, ll, *ref, Rw, Rl, beta)[0].backward()
    # dloss/dLw = (gap - h) * 0.5*beta / B with h = 0 here
    assert lw.grad[0].item() == pytest.approx(1.0 * 0.5 * beta / 2) and ll.grad[0].item() < 0
    assert lw.grad[1].item() == 0.0 and ll.grad[1].item() == 0.0  # tie at h = 0: nothing to do
    # a tie with a margin pulls the margin back to 0
    lw2, ll2 = torch.tensor([0.4], requires_grad=True), torch.tensor([0.5], requires_grad=True)
    diffusion_copg_loss(lw2, ll2, torch.tensor([0.5]), torch.tensor([0.5]), 0.3, 0.3, beta)[0].backward()
    assert lw2.grad.item() < 0 and ll2.grad.item() > 0


# ---------------------------------------------------------------------------------- data
def test_perturb_caption_deterministic_and_different():
    c = "a red cat sitting on a wooden chair"
    for mode in ("drop", "shuffle", "drop_shuffle"):
        p = perturb_caption(c, mode)
        assert p == perturb_caption(c, mode) and p != c
    assert len(perturb_caption(c, "drop").split()) == len(c.split()) - 2  # round(0.3 * 8)
    assert sorted(perturb_caption(c, "shuffle").split()) == sorted(c.split())
    assert perturb_caption("", "drop") == "" and perturb_caption("cat", "drop") == ""
    assert perturb_caption("a cat", "shuffle") == "cat a"
    with pytest.raises(ValueError):
        perturb_caption(c, "nope")


@pytest.fixture(scope="module")
def pair_ds(tmp_path_factory):
    import datasets

    cols = make_toy_pickapic_rows(6, size=16, seed=1, tie_fraction=0.0)
    cols["caption_0"] = [f"image zero of row {i}" for i in range(6)]
    cols["caption_1"] = [f"image one of row {i}" for i in range(6)]
    table = pickapic_table(cols).append_column("caption_0", __import__("pyarrow").array(cols["caption_0"]))
    table = table.append_column("caption_1", __import__("pyarrow").array(cols["caption_1"]))
    table = table.append_column("reward_0", __import__("pyarrow").array([float(i) for i in range(6)]))
    table = table.append_column("reward_1", __import__("pyarrow").array([10.0 + i for i in range(6)]))
    out = tmp_path_factory.mktemp("variants")
    pq.write_table(table, out / "p.parquet")
    return datasets.load_dataset("parquet", data_files={"train": [str(out / "p.parquet")]}, split="train")


def _rows_by_example(stream, ds, n):
    """(row, example) for the first n rows (in order), through the stream's own _example."""
    import random

    out = []
    for i in range(n):
        e = stream._example(ds[i], random.Random(0), Counter())
        out.append((ds[i], e))
    return out


def test_dual_caption_stream_uses_loser_caption_and_falls_back(pair_ds):
    opts = VariantDataOptions(resolution=16, random_flip=False)
    for row, e in _rows_by_example(DualCaptionPairStream(pair_ds, opts), pair_ds, 6):
        loser = 0 if row["label_0"] < row["label_1"] else 1
        assert e["caption"] == row["caption"] and e["caption_l"] == row[f"caption_{loser}"]
        assert e["pixels_w"][0].mean() > e["pixels_w"][2].mean()  # chosen (warm) first
    opts = VariantDataOptions(resolution=16, random_flip=False, rejected_caption_column="caption_0")
    row, e = _rows_by_example(DualCaptionPairStream(pair_ds, opts), pair_ds, 1)[0]
    assert e["caption_l"] == row["caption_0"]
    plain = pair_ds.remove_columns(["caption_0", "caption_1"])
    row, e = _rows_by_example(DualCaptionPairStream(plain, VariantDataOptions(resolution=16)), plain, 1)[0]
    assert e["caption_l"] == perturb_caption(row["caption"]) != row["caption"]
    batch = collate_variant([e, e])
    assert batch.captions_l == [e["caption_l"]] * 2 and batch.pixels_l.shape[0] == 2


def test_reward_stream_swaps_rewards_with_images(pair_ds):
    opts = VariantDataOptions(resolution=16, random_flip=False)
    for row, e in _rows_by_example(RewardPairStream(pair_ds, opts), pair_ds, 6):
        swap = row["label_0"] < row["label_1"]
        assert (e["reward_w"], e["reward_l"]) == ((row["reward_1"], row["reward_0"]) if swap else (row["reward_0"], row["reward_1"]))
    plain = pair_ds.remove_columns(["reward_0", "reward_1"])
    for _, e in _rows_by_example(RewardPairStream(plain, opts), plain, 6):
        assert (e["reward_w"], e["reward_l"]) == (1.0, 0.0)
    b = collate_variant([e, e])
    assert b.rewards_w.tolist() == [1.0, 1.0]


def test_unpaired_streams(pair_ds, tmp_path):
    opts = VariantDataOptions(resolution=16, random_flip=False)
    (_, e), = _rows_by_example(UnpairedStream(pair_ds, opts, paired=True), pair_ds, 1)
    assert e["pixels"].shape == (2, 3, 16, 16) and e["desirable"] == [True, False]
    assert e["pixels"][0][0].mean() > e["pixels"][0][2].mean()  # desirable = the chosen (warm) image
    write_toy_captions(tmp_path / "u", 8, size=16, labels=True)
    ds = load_rows(str(tmp_path / "u"), opts)
    b = collate_variant([e for _, e in _rows_by_example(UnpairedStream(ds, opts, paired=False), ds, 8)])
    assert b.pixels.shape == (8, 3, 16, 16) and b.desirable.tolist() == [bool(x) for x in ds["label"]]
    warm = b.pixels[:, 0].mean((1, 2)) > b.pixels[:, 2].mean((1, 2))
    assert torch.equal(warm, b.desirable)  # toy labels: warm = liked


def test_tpo_caption_pairs(tmp_path):
    write_toy_captions(tmp_path / "c", 4, size=16)
    opts = VariantDataOptions(resolution=16, random_flip=False)
    ds = load_rows(str(tmp_path / "c"), opts)
    pairs = _rows_by_example(CaptionPairStream(ds, opts), ds, 4)
    b = collate_variant([e for _, e in pairs])
    assert b.pixels_l is None and b.pixels_w.shape == (4, 3, 16, 16)
    assert b.captions == ds["caption"] and b.captions_l == [perturb_caption(c) for c in ds["caption"]]
    kto = collate_variant([e for _, e in _rows_by_example(CaptionPairStream(ds, opts, unpaired=True), ds, 4)])
    assert kto.desirable.tolist() == [True, False] * 4 and torch.equal(kto.pixels[0], kto.pixels[1])
    with pytest.raises(Exception, match="caption"):
        load_rows(str(tmp_path / "c"), VariantDataOptions(caption_column="prompt"))


def test_config_keys_validate(tmp_path):
    base = ["model=m", "data=d"]
    cfg = load_config(None, ["method=tpo", *base, "loss.base=kto"])
    assert cfg.loss_kind == "kto" and cfg.needs_reference and cfg.beta == 5000.0
    assert load_config(None, ["method=inpo", *base]).noising == "ddim_inversion"
    assert load_config(None, ["method=sft", *base]).needs_reference is False
    assert load_config(None, ["method=sft", *base, "loss.noising=ddim_inversion"]).needs_reference
    for bad in ("loss.base=ipo", "loss.noising=ddpm", "loss.tau=0", "loss.inversion_steps=0",
                "data_opts.caption_perturbation=reverse"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, ["method=tpo", *base, bad])


# ---------------------------------------------------------------------------------- inversion
def test_ddim_inversion_step_and_grid_by_hand():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    a0, a1 = torch.tensor([0.9, 0.8]), torch.tensor([0.5, 0.3])
    out = ddim_inversion_step(x, eps, a0, a1)
    for i in range(2):
        x0 = (x[i] - math.sqrt(1 - a0[i]) * eps[i]) / math.sqrt(a0[i])
        torch.testing.assert_close(out[i], math.sqrt(a1[i]) * x0 + math.sqrt(1 - a1[i]) * eps[i])
    assert [s.tolist() for s in inversion_grid(torch.tensor([999, 10]), 3)] == [[0, 0], [333, 3], [666, 7], [999, 10]]


def test_ddim_invert_matches_hand_written_steps_and_is_deterministic():
    ac = torch.linspace(0.999, 0.01, 1000)
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(5))

    def model(x, s):  # a deterministic toy "eps-model"
        return torch.tanh(x @ w) * (1 + s.float()[:, None] / 1000)

    x0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([500, 20, 999])
    one = ddim_invert(model, x0, t, ac, steps=1)
    e = model(x0, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(one, ac[t].sqrt()[:, None] * x0 + (1 - ac[t]).sqrt()[:, None] * e)
    two = ddim_invert(model, x0, t, ac, steps=2)
    mid = torch.tensor([250, 10, 500])
    x1 = ac[mid].sqrt()[:, None] * x0 + (1 - ac[mid]).sqrt()[:, None] * e
    x2 = ddim_inversion_step(x1, model(x1, mid), ac[mid], ac[t])
    torch.testing.assert_close(two, x2)
    assert torch.equal(two, ddim_invert(model, x0, t, ac, steps=2))
    # the implied noise reproduces x_t through the forward process
    eps = implied_eps(two, x0, ac[t])
    torch.testing.assert_close(ac[t].sqrt()[:, None] * x0 + (1 - ac[t]).sqrt()[:, None] * eps, two)


def test_flow_invert_by_hand():
    x0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(7))

    def v(x, s):
        return -x + s[:, None]

    sig = torch.tensor([0.6, 0.2])
    x1 = x0 + 0.3 * v(x0, torch.zeros(2)) * torch.tensor([[1.0], [1 / 3]])
    x2 = x1 + torch.tensor([[0.3], [0.1]]) * v(x1, sig / 2)
    torch.testing.assert_close(flow_invert(v, x0, sig, 2), x2)


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_adapter_inversion_deterministic_uses_reference_and_matches_hand_step(tiny_model, kind):
    from diffalign.config import LoraOptions
    from diffalign.models import load_adapter

    adapter = load_adapter(tiny_model(kind))
    adapter.add_lora(LoraOptions(rank=4, init="gaussian"))
    for n, p in adapter.denoiser.named_parameters():  # make the LoRA matter
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    x0 = torch.randn(2, *adapter.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    cond = adapter.encode_prompt(["a cat", "a dog"])
    T = adapter.num_train_timesteps
    t = torch.tensor([T // 2, T // 5]) if not adapter.is_flow else adapter.train_sigmas[torch.tensor([200, 700])] * T
    x_t, target = inverted_input_and_target(adapter, x0, t, cond, steps=1)
    x_t2, target2 = inverted_input_and_target(adapter, x0, t, cond, steps=1)
    assert torch.equal(x_t, x_t2) and torch.equal(target, target2)
    with torch.no_grad(), adapter.adapters_disabled():
        if not adapter.is_flow:
            e = adapter.predict(x0, torch.zeros(2, dtype=torch.long), cond).float()
            a = adapter.alphas_cumprod[t].float().view(-1, 1, 1, 1)
            torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * e, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(target, e, rtol=1e-4, atol=1e-4)  # implied eps = the step's eps
        else:
            v = adapter.predict(x0, torch.zeros(2), cond).float()
            s = adapter.sigma(t).view(-1, 1, 1, 1)
            torch.testing.assert_close(x_t, x0 + s * v, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(target, v, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # with the LoRA on, the same step differs: the reference was used
        e_on = adapter.predict(x0, torch.zeros(2, dtype=torch.long) if not adapter.is_flow else torch.zeros(2), cond).float()
    assert not torch.allclose(e_on, target, atol=1e-3)


# ---------------------------------------------------------------------------------- registry
def test_every_registered_method_declares_what_the_trainer_derives(tmp_path):
    """The pair trainer's config reads beta, the reference, the noising and the data variant
    from the method's class; each registered method has a tiny config that loads."""
    from pathlib import Path

    from diffalign.data.batches import PairBatch
    from diffalign.losses.methods import OFFLINE_METHODS, DataVariant, OfflineMethod, PairMSEs

    root = Path(__file__).resolve().parents[1] / "diffalign" / "configs" / "tiny"
    assert set(OFFLINE_METHODS) == {"dpo", "mapo", "sft", "kto", "dcpo", "tpo", "ipo", "copg", "inpo"}
    for name, method in OFFLINE_METHODS.items():
        assert issubclass(method, OfflineMethod) and method.name == name and isinstance(method.variant, DataVariant)
        cfg = load_config(root / f"{name}.yaml", ["model=m", "data=d", "loss.beta=null", "loss.noising=null"])
        assert cfg.objective.resolve(cfg.loss) is cfg.objective
        assert cfg.beta == method.resolve(cfg.loss).default_beta
        assert cfg.noising == method.noising
        assert cfg.needs_reference == (method.needs_reference or method.noising == "ddim_inversion")
    assert load_config(None, ["method=mapo", "model=m", "data=d"]).beta == 0.1
    assert load_config(None, ["method=tpo", "model=m", "data=d", "loss.base=kto"]).objective.variant == DataVariant.CAPTION_UNPAIRED
    # a method object is callable on MSEs + the batch: CoPG reads the batch's rewards when present
    copg = OFFLINE_METHODS["copg"](beta=2.0)
    w, l = torch.tensor([0.2, 0.4]), torch.tensor([0.3, 0.1])
    batch = PairBatch(pixels_w=torch.zeros(2, 3, 2, 2), captions=["a", "b"],
                      rewards_w=torch.tensor([3.0, 3.0]), rewards_l=torch.tensor([0.0, 0.0]))
    with_rewards = copg(PairMSEs(w, l, w, l), batch)[1]["reward_gap"]
    default = copg(PairMSEs(w, l, w, l), None)[1]["reward_gap"]
    assert with_rewards.item() == 3.0 and default.item() == 1.0
    with pytest.raises(ConfigError, match="cached_reference"):
        load_config(None, ["method=mapo", "model=m", "data=d", "data_opts.cache_dir=c", "loss.cached_reference=true"])


def test_trainers_and_data_name_no_method():
    """What differs between methods lives on the method classes: no module under trainers/ or
    data/ spells a registered method's name as a string."""
    import ast
    from pathlib import Path

    from diffalign.losses.methods import OFFLINE_METHODS

    pkg = Path(__file__).resolve().parents[1] / "diffalign"
    found = []
    for f in [*(pkg / "trainers").rglob("*.py"), *(pkg / "data").rglob("*.py")]:
        tree = ast.parse(f.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        found += [f"{f.name}:{n.lineno} {n.value!r}" for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and n.value in OFFLINE_METHODS and id(n) not in docstrings]
    assert not found, found
