"""Tests of editing.py (SDEdit, Meng et al. 2022; inpainting by replacement with RePaint's resampling, Lugmayr et al.
2022): the noising step against q's moments (Monte Carlo), RePaint's jump back up the chain against the chain's own
marginals, its schedule against Appendix B and Algorithm 1 written out and the edit loop walking it (x_0 never noised
again), strength 0 as the identity, SDEdit as the reverse process started from q(x_t0 | x_0) (on a spaced chain, the
respaced chain's Algorithm 2 written out), the known region on q(x_t | x_0) after every step and exactly the input at
the end; then sample.py --edit / --mask / --png-dir end to end, and bad masks as one line each."""
import pytest
import torch
from hypothesis import given, strategies as st

import editing
import sample
from checkpoint import build_diffusion
from conftest import (FAST, SLOW, TINY_DIFFUSION, TINY_NET, decode_png, full, one_line_error, randomized, read_npz,
                      schedules, write_checkpoint)
from data import make_shapes
from ddpm import GaussianDiffusion
from editing import edit_loop, edit_start, jump_back, noise_to, repaint_schedule
from imagefiles import write_npz
from samplers import alpha_sigma, spaced_timesteps
from unet import UNet


@SLOW
@given(schedules(min_t=10, max_t=200), st.integers(0, 2**31 - 1), st.data())
def test_the_noising_step_is_q_and_a_jump_back_keeps_the_chains_marginals(betas, seed, data):
    """noise_to(x0, t) has q(x_t | x_0)'s moments, sqrt(abar_t) x_0 and 1 - abar_t (Eq. 4); and RePaint's jump from
    t' up to t > t' applied to x_t' ~ q(x_t' | x_0) gives q(x_t | x_0) again (the chain's Markov property), which a
    wrong jump (a step's beta for a stretch's, or the square root left out) does not. Monte Carlo, 6 standard
    errors."""
    d = GaussianDiffusion(betas, dtype=torch.float64)
    t_lo = data.draw(st.integers(-1, len(betas) - 2))
    t = data.draw(st.integers(t_lo + 1, len(betas) - 1))
    g, n = torch.Generator().manual_seed(seed), 40_000
    x0 = torch.rand(1, 3, dtype=torch.float64, generator=g) * 2 - 1
    draw = lambda: torch.randn(n, 3, dtype=torch.float64, generator=g)
    abar = d.alphas_cumprod[t]
    for x in (noise_to(d, x0, t, draw()), jump_back(d, noise_to(d, x0, t_lo, draw()), t_lo, t, draw())):
        se = (1 - abar).sqrt() / n ** 0.5
        assert ((x.mean(0) - abar.sqrt() * x0[0]).abs() < 6 * se + 1e-9).all()
        assert ((x.var(0) - (1 - abar)).abs() < 6 * (1 - abar) * (2 / n) ** 0.5 + 1e-9).all()


def test_repaint_schedule():
    """Appendix B's schedule: r = 1 is the plain chain; otherwise it starts at 0, ends at the data, moves one
    position at a time, and every jump-th stretch is walked r times."""
    assert repaint_schedule(5) == [(k, k + 1) for k in range(5)]
    moves = repaint_schedule(10, jump=2, resample=3)
    assert moves[0][0] == 0 and moves[-1][1] == 10
    assert all(abs(a - b) == 1 for a, b in moves) and all(b == c for (_, b), (c, _) in zip(moves, moves[1:]))
    down = sum(b > a for a, b in moves)
    assert down - sum(b < a for a, b in moves) == 10 and down == 10 + 2 * 2 * 4  # 4 jump points, 2 extra passes


def appendix_b(T, jump, resample):
    """RePaint's Appendix B written out in its own index, t = T - 1 (pure noise) down to -1 (the data): the chain
    visits every t once on its way down, and on arriving at t = 0, jump, 2 jump, ... below T - jump it goes jump
    steps back up and down again to t, resample - 1 times (the jumps of the reference's get_schedule_jump)."""
    ts = []
    for t in range(T - 1, -1, -1):
        ts.append(t)
        if t % jump == 0 and t < T - jump:
            for _ in range(resample - 1):
                ts += list(range(t + 1, t + jump + 1)) + list(range(t + jump - 1, t - 1, -1))
    return ts + [-1]


def algorithm_1(T, U):
    """RePaint's Algorithm 1 written out (its jump of one step), in 0-based indices i = t - 1 (x_t is at index
    t - 1, x_0 at -1): for t = T..1, for u = 1..U: x_{t-1} from x_t (a move down), and if u < U and t > 1, x_t again
    from x_{t-1} (a move up). At t = 1 the U passes draw no noise and start from the same x_1: one move."""
    moves = []
    for t in range(T, 0, -1):
        for u in range(1, U + 1):
            if t > 1 or u == U:
                moves.append((t - 1, t - 2))
            if u < U and t > 1:
                moves.append((t - 2, t - 1))
    return moves


def as_indices(moves, T):
    """repaint_schedule's positions (0 the start .. T the data) as RePaint's indices: position p is index T - 1 - p."""
    return [(T - 1 - p, T - 1 - q) for p, q in moves]


@FAST
@given(st.integers(1, 60), st.integers(1, 12), st.integers(1, 5))
def test_repaint_schedule_is_appendix_b_written_out(T, jump, resample):
    """repaint_schedule(T, jump, r), read as RePaint's indices, is Appendix B's schedule written out independently
    (appendix_b); for jump 1 also Algorithm 1 written out; and with T = 20, jump 5 the chain turns back up at indices
    0, 5 and 10 (x_1, x_6, x_11 in the paper's 1-based names), never at -1: x_0 is not noised again once reached."""
    ts = appendix_b(T, jump, resample)
    moves = as_indices(repaint_schedule(T, jump, resample), T)
    assert moves == list(zip(ts, ts[1:]))
    if jump == 1:
        assert moves == algorithm_1(T, resample)
    assert all(a >= 0 for a, _ in moves)  # no move starts from the data
    moves = as_indices(repaint_schedule(20, 5, 2), 20)
    turns = {b for (a, b), (_, c) in zip(moves, moves[1:]) if a > b < c}  # down into b, then up out of it
    assert turns == {0, 5, 10}


@pytest.mark.parametrize("steps, start, jump, resample", [(None, None, 5, 3), (None, None, 1, 2), (10, 59, 3, 2)])
def test_the_edit_loop_walks_the_schedule_and_never_renoises_x0(monkeypatch, steps, start, jump, resample):
    """edit_loop with a mask takes Appendix B's moves in order on its chain's levels (a denoising step from each level
    the schedule goes down from, a jump back from each it goes up from), the full chain or a spaced one from an
    SDEdit start; the last operation is the denoising step into x_0 and x_0 is never the start of a jump."""
    d = build_diffusion(TINY_DIFFUSION)
    ops = []
    real_jump_back = editing.jump_back
    monkeypatch.setattr(editing, "jump_back", lambda diffusion, x, t_from, t_to, noise:
                        ops.append(("up", t_from, t_to)) or real_jump_back(diffusion, x, t_from, t_to, noise))
    x0 = torch.rand(1, 3, 8, 8) * 2 - 1
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    edit_loop(d, lambda x, t: 0.1 * x, x0, mask, start=start, steps=steps, jump=jump, resample=resample,
              generator=torch.Generator().manual_seed(0), callback=lambda t, x, x0_hat: ops.append(("down", t)))
    start = d.num_timesteps - 1 if start is None else start
    steps = start + 1 if steps is None else steps
    levels = spaced_timesteps(start + 1, steps, "trailing") + [-1]  # RePaint's index i is at levels[steps - 1 - i]
    level = lambda i: levels[steps - 1 - i]
    ts = appendix_b(steps, jump, resample)
    expected = [("down", level(a)) if b < a else ("up", level(a), level(b)) for a, b in zip(ts, ts[1:])]
    assert ops == expected
    assert ops[-1] == ("down", levels[-2]) and ops.count(("down", levels[-2])) == 1


def test_strength_zero_is_the_identity_and_strength_sets_t0():
    """S = 0 returns the images as they are (no step, no noise); t_0 = round(S T) - 1, so S = 1 starts at T - 1."""
    d = build_diffusion(TINY_DIFFUSION)
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    assert edit_start(100, 0.0) == -1 and edit_start(100, 1.0) == 99 and edit_start(100, 0.5) == 49
    assert torch.equal(edit_loop(d, lambda x, t: x, x0, start=edit_start(100, 0.0)), x0)
    with pytest.raises(ValueError, match="--strength must be in"):
        edit_start(100, 1.5)


@pytest.mark.parametrize("strength", [0.3, 1.0])
def test_sdedit_is_the_reverse_process_started_from_q(strength):
    """SDEdit without a mask is Algorithm 2 from x_t0 = q_sample(x_0, t_0): the same draws (x_t0's noise first, then
    each step's z) give the same samples as p_sample_loop started at t_0."""
    d = build_diffusion(TINY_DIFFUSION)
    net = randomized(UNet(**TINY_NET))
    model = lambda x, t: net(x, t)
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    start = edit_start(100, strength)
    ours = edit_loop(d, model, x0, start=start, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    x_t = d.q_sample(x0, full(2, start), torch.randn(x0.shape, generator=g))
    with torch.no_grad():
        theirs = d.p_sample_loop(model, x0.shape, x_t, g, start=start)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@FAST
@given(schedules(min_t=10, max_t=120), st.floats(0.05, 1.0), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_an_ancestral_edit_on_a_spaced_chain_is_the_respaced_chains_algorithm_2(betas, strength, steps, seed):
    """SDEdit with the ancestral sampler ("ddpm") on a spaced chain of K <= t_0 steps is Algorithm 2 of the respaced
    chain: each step t -> t' draws from the posterior of DDPM Eqs. (6)-(7) with the stretch's beta~ = 1 - abar_t /
    abar_t', mean sqrt(abar_t') beta~ / (1 - abar_t) x0_hat + sqrt(1 - beta~) (1 - abar_t') / (1 - abar_t) x_t and
    variance (1 - abar_t') beta~ / (1 - abar_t), x0_hat clipped; written out here in float64 from the same draws
    (x_t0's noise, then one z a step). DDIM's deterministic step (eta 0) is not it."""
    T = len(betas)
    start = edit_start(T, strength)
    steps = min(steps, start)
    if steps < 1:
        return
    d = GaussianDiffusion(betas, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    model = lambda x, t: torch.tanh(1.5 * x) + 0.3 * torch.cos(t.view(-1, 1, 1, 1).double())
    ours = edit_loop(d, model, x0, start=start, steps=steps, sampler="ddpm",
                     generator=torch.Generator().manual_seed(seed))
    abar = torch.cumprod(1 - betas.double(), 0)
    ab = lambda i: abar[i] if i >= 0 else torch.tensor(1.0, dtype=torch.float64)
    levels = spaced_timesteps(start + 1, steps) + [-1]
    g = torch.Generator().manual_seed(seed)
    draw = lambda: torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x = ab(levels[0]).sqrt() * x0 + (1 - ab(levels[0])).sqrt() * draw()
    for t, t_prev in zip(levels, levels[1:]):
        x0_hat = ((x - (1 - abar[t]).sqrt() * model(x, full(2, t))) / abar[t].sqrt()).clamp(-1, 1)
        beta = 1 - abar[t] / ab(t_prev)
        mean = (ab(t_prev).sqrt() * beta / (1 - abar[t]) * x0_hat
                + (1 - beta).sqrt() * (1 - ab(t_prev)) / (1 - abar[t]) * x)
        x = mean + ((1 - ab(t_prev)) * beta / (1 - abar[t])).sqrt() * draw()
    assert torch.allclose(ours, x, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("sampler, steps, resample", [("ddpm", None, 1), ("ddim", 10, 1), ("ddpm", 20, 3)])
def test_inpainting_keeps_the_known_region_exactly(sampler, steps, resample):
    """With a mask the known region of the output is the input itself, bit for bit, for every sampler offered and
    with RePaint's resampling; the unknown region is the model's (not the input)."""
    d = build_diffusion(TINY_DIFFUSION)
    net = randomized(UNet(**TINY_NET))
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    out = edit_loop(d, lambda x, t: net(x, t), x0, mask, steps=steps, sampler=sampler, resample=resample, jump=2,
                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[..., :4], x0[..., :4]) and not torch.allclose(out[..., 4:], x0[..., 4:])

@pytest.mark.parametrize("sampler, steps, resample", [("ddpm", None, 1), ("ddim", 10, 1), ("ddpm", None, 3)])
def test_inpainting_puts_the_known_region_on_q_after_every_step(sampler, steps, resample):
    """RePaint Eq. (8) at every step, not only at the end: after each reverse step into level t' (the callback's x),
    the known region is a draw of q(x_t' | x_0) (DDPM Eq. 4), so (x - sqrt(abar_t') x_0) / sqrt(1 - abar_t') has mean
    0 and variance 1 over its 6144 pixels (6 standard errors), and at the data (t' = -1) it is x_0 bit for bit; for
    the plain chain, a spaced DDIM one and with RePaint's jumps. A loop that composites at the step's starting level
    t, or never and pastes x_0 in at the end, fails."""
    d = build_diffusion(TINY_DIFFUSION)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :16] = 1
    levels = spaced_timesteps(d.num_timesteps, steps or d.num_timesteps) + [-1]
    reached = []

    def check(t, x, x0_hat):
        level = levels[levels.index(t) + 1]  # where this step went
        known, x0_known = x[..., :16].double(), x0[..., :16].double()
        if level == -1:
            assert torch.equal(x[..., :16], x0[..., :16])
        else:
            alpha, sigma = alpha_sigma(d, level)
            r = (known - alpha * x0_known) / sigma
            n = r.numel()
            assert abs(r.mean()) < 6 / n ** 0.5 and abs(r.var() - 1) < 6 * (2 / n) ** 0.5, (level, r.mean(), r.var())
        reached.append(level)

    edit_loop(d, lambda x, t: 0.1 * x, x0, mask, steps=steps, sampler=sampler, resample=resample, jump=5,
              generator=torch.Generator().manual_seed(1), callback=check)
    assert reached[-1] == -1 and set(reached) == set(levels[1:])

# ---- sample.py --edit


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny checkpoint and six 8x8 shapes to edit."""
    folder = tmp_path_factory.mktemp("edit")
    write_checkpoint(str(folder / "ckpt.pt"))
    images, labels = make_shapes(6, 8, 3, seed=4)
    write_npz(str(folder / "in.npz"), {"arr_0": images, "arr_1": labels})
    return folder, images


def run(argv, capsys):
    sample.main([*argv, "--device", "cpu"])
    return capsys.readouterr().out


def test_edit_and_inpaint_from_the_command_line(files, tmp_path, capsys):
    """sample.py --edit IMAGES: -n defaults to their number; --strength 0 writes them back unchanged; --mask
    left-half keeps the right half exactly; --png-dir writes one PNG per sample, named by index."""
    folder, images = files
    common = [str(folder / "ckpt.pt"), "--edit", str(folder / "in.npz"), "--steps", "10", "--out", str(tmp_path / "g.png")]
    run([*common, "--strength", "0", "--npz", str(tmp_path / "same.npz")], capsys)
    assert torch.equal(read_npz(tmp_path / "same.npz")["arr_0"], images)
    out = run([*common, "--mask", "left-half", "--npz", str(tmp_path / "in.npz"), "--png-dir", str(tmp_path / "p")],
              capsys)
    got = read_npz(tmp_path / "in.npz")["arr_0"]
    assert got.shape == images.shape and torch.equal(got[:, :, 4:], images[:, :, 4:]) and "DDIM eta 0.0, 10 steps" in out
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [f"{k:06d}.png" for k in range(6)]
    assert torch.equal(decode_png(tmp_path / "p" / "000002.png"), got[2])


@pytest.mark.parametrize("case, expect", [
    ("wrong_size", "masks of shape"), ("not_binary", "nothing in between"), ("all_black", "keeps nothing"),
    ("all_white", "keeps everything"), ("unknown_name", "no such file, and not one of"),
    ("mask_without_edit", "are for --edit"), ("dpm_solver", "not dpm++"), ("restart", "not restart"),
    ("strength_above_one", "--strength must")])
def test_bad_masks_and_edits_are_one_line(case, expect, files, tmp_path, capsys):
    folder, _ = files
    masks = {"wrong_size": torch.ones(1, 6, 6, dtype=torch.uint8), "not_binary": torch.full((1, 8, 8), 7).byte(),
             "all_black": torch.zeros(1, 8, 8, dtype=torch.uint8), "all_white": torch.ones(1, 8, 8, dtype=torch.uint8)}
    for name, m in masks.items():
        write_npz(str(tmp_path / f"{name}.npz"), {"arr_0": m})
    mask = {"unknown_name": "top-half"}.get(case, str(tmp_path / f"{case}.npz") if case in masks else "left-half")
    argv = [str(folder / "ckpt.pt"), "--edit", str(folder / "in.npz"), "--mask", mask, "--out", str(tmp_path / "g.png"),
            "--device", "cpu"]
    argv = {"mask_without_edit": [str(folder / "ckpt.pt"), "--mask", "left-half", "--device", "cpu"],
            "dpm_solver": [*argv, "--sampler", "dpm++", "--steps", "5"],
            "restart": [*argv, "--sampler", "restart", "--steps", "10"],
            "strength_above_one": [*argv, "--strength", "1.5"]}.get(case, argv)
    assert expect in one_line_error(sample.main, argv, capsys)
    assert not (tmp_path / "g.png").exists()
