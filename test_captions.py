"""Tests of caption conditioning (latent diffusion's cross-attention, Rombach et al. 2022, Sec. 3.3): the tokenizer, the
caption encoder's positions, cross-attention against its formula, what a caption model adds to the U-Net, the empty
caption as the null condition in training and in guidance, the captioned shapes, a caption model that draws the
colour it is asked for, and bad input one line each."""
import pytest
import torch
from hypothesis import given, strategies as st

from captions import CaptionEncoder, CaptionUNet as UNet, CrossAttention, caption_words, tokenize
from conftest import (FAST, TINY, TRAIN_TINY, assert_one_line_error, inputs, one_line_error, randomized, read_npz,
                      run_script)
from data import CAPTIONS, COLOURS, SHAPES_CLASSES, make_shapes
from ddpm import GaussianDiffusion, make_beta_schedule
from guidance import model_fn, null_condition
from training import DiffusionLoss

WORDS = ["red", "green", "blue", "disk", "cross", "big", "small", "a"]


@FAST
@given(st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=4).map(" ".join), min_size=1, max_size=6),
       st.data())
def test_tokens_spell_the_caption_then_pad(captions, data):
    """Any text in the training captions' words, up to their length, comes back word for word from its tokens,
    padded with 0 (the empty caption is all 0); case and spacing do not matter; an unknown word or one word too many
    is a ValueError naming the caption."""
    vocab, length = caption_words(captions)
    assert vocab[0] == "" and sorted(vocab[1:]) == vocab[1:] == sorted({w for c in captions for w in c.split()})
    known = vocab[1:]
    texts = data.draw(st.lists(st.lists(st.sampled_from(known), max_size=length).map(" ".join), min_size=1))
    ids = tokenize([t.upper().replace(" ", "  ") for t in texts], captions)
    assert ids.shape == (len(texts), length) and ids.dtype == torch.long
    for text, row in zip(texts, ids.tolist()):
        k = len(text.split())
        assert [vocab[i] for i in row[:k]] == text.split() and row[k:] == [0] * (length - k) and 0 not in row[:k]
    with pytest.raises(ValueError, match="caption 'purple'"):
        tokenize(["purple"], captions)
    with pytest.raises(ValueError, match="words; the model's captions have at most"):
        tokenize([" ".join([known[0]] * (length + 1))], captions)


@FAST
@given(st.integers(1, 3), st.sampled_from([4, 8, 12]), st.integers(1, 5), st.integers(1, 5), st.integers(0, 2 ** 16))
def test_cross_attention_is_softmax_of_q_k_over_root_c_times_v(batch, channels, side, length, seed):
    """CrossAttention (SDPA) against Sec. 3.3's formula written out in float64: x + W_out softmax(Q K^T / sqrt(C)) V,
    Q = W_Q norm(x) over the H*W positions, K = W_K c and V = W_V c over the caption's tokens."""
    torch.manual_seed(seed)
    m = CrossAttention(channels, 6).double()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x, c = torch.randn(batch, channels, side, side + 1).double(), torch.randn(batch, length, 6).double()
    h = m.norm(x).flatten(2).transpose(1, 2)
    q, k, v = h @ m.q.weight.T + m.q.bias, c @ m.k.weight.T + m.k.bias, c @ m.v.weight.T + m.v.bias
    w = torch.softmax(q @ k.transpose(1, 2) / channels ** 0.5, dim=-1)  # (B, HW, L): each position over the tokens
    out = (w @ v) @ m.proj_out.weight.T + m.proj_out.bias
    expected = x + out.transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(m(x, c), expected)


@FAST
@given(st.lists(st.sampled_from(WORDS), min_size=2, max_size=4, unique=True), st.integers(0, 2 ** 16))
def test_the_caption_encoder_knows_where_each_word_is(words, seed):
    """tau_theta reads token plus position embeddings (a transformer over a sequence, Rombach et al. 2022, Sec. 3.3).
    A transformer without masks or positions is permutation-equivariant: with the position embeddings at 0 (as
    built), reversing a caption's words only reverses the rows of its output. With them learnt (random here) it is
    not: a row depends on where its word is, so "red disk" and "disk red" are told apart."""
    captions = [" ".join(words)]  # the only caption: its length is the model's, no padding
    vocab, length = caption_words(captions)
    torch.manual_seed(seed)
    encoder = CaptionEncoder(len(vocab), length, 16).eval()
    y, backwards = tokenize(captions, captions), tokenize([" ".join(reversed(words))], captions)
    with torch.no_grad():
        torch.testing.assert_close(encoder(backwards).flip(1), encoder(y), atol=1e-5, rtol=1e-5)
        encoder.position.normal_()
        assert (encoder(backwards).flip(1) - encoder(y)).abs().max() > 1e-2


def test_a_caption_model_adds_only_its_encoder_and_cross_attention():
    """captions=[...] adds the caption encoder and a cross-attention after every self-attention, nothing else, and
    no class embedding; the caption changes the output, y=None is the empty caption (all padding), a sample's output
    does not depend on the rest of the batch; class labels and captions together are refused."""
    plain, net = UNet(**TINY), UNet(**TINY, captions=["red disk", "blue cross", "green disk"])
    extra = set(net.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) < set(net.state_dict()) and net.label_emb is None
    attention = [k for k in plain.state_dict() if k.endswith(".q.weight")]
    assert {k for k in extra if not k.startswith("caption_encoder.")} == {
        k.replace(".q.weight", f".cross.{p}.{w}") for k in attention for p in ("norm", "q", "k", "v", "proj_out")
        for w in ("weight", "bias")}
    assert len(attention) == 4 and net.config["captions"] == ["red disk", "blue cross", "green disk"]
    net = randomized(net)
    x, t = inputs(3, size=16)
    y = tokenize(["red disk", "blue cross", "green"], net.captions)
    with torch.no_grad():
        out = net(x, t, y)
        assert (out - net(x, t, tokenize(["blue disk", "red cross", "red"], net.captions))).abs().max() > 1e-4
        kind = (out - net(x, t, tokenize(["red cross", "blue disk", "green"], net.captions)))[:2]  # the 2nd word
        assert kind.flatten(1).abs().max(1).values.min() > 1e-4
        torch.testing.assert_close(net(x, t), net(x, t, torch.zeros_like(y)))
        torch.testing.assert_close(net(x[1:2], t[1:2], y[1:2]), out[1:2], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="not both"):
        UNet(**TINY, num_classes=3, captions=["red disk"])
    with pytest.raises(ValueError, match="captions must be"):
        UNet(**TINY, captions=["red disk", " "])


@FAST
@given(st.lists(st.sampled_from(CAPTIONS), min_size=1, max_size=4), st.integers(0, 2 ** 16))
def test_with_its_cross_attention_silenced_a_caption_model_is_the_plain_one(asked, seed):
    """The caption model is the plain U-Net plus residual cross-attention: given the plain net's weights and every
    cross-attention's output layer at 0, it computes the plain net's eps whatever the caption (another route to
    the same output: the self-attention path is untouched)."""
    plain = randomized(UNet(**TINY), seed=seed % 7)
    net = randomized(UNet(**TINY, captions=list(CAPTIONS)), seed=seed % 5)
    net.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, CrossAttention):
                m.proj_out.weight.zero_()
                m.proj_out.bias.zero_()
        x, t = inputs(len(asked), size=16, seed=seed)
        torch.testing.assert_close(net(x, t, tokenize(asked, net.captions)), plain(x, t))


@FAST
@given(st.floats(0.0, 1.0), st.integers(0, 2 ** 16))
def test_a_dropped_caption_is_the_empty_caption(p_uncond, seed):
    """Classifier-free guidance's dropping for a caption model: a label k reaches the network as captions[k]'s
    tokens, and a dropped one as the empty caption (all 0), the null condition guidance subtracts (null_condition),
    with the draws of a class-conditional run (the same rows drop)."""
    captions = ["red disk", "blue cross", "yellow square triangle"]
    diffusion = GaussianDiffusion(make_beta_schedule("linear", 10))
    seen = []
    def model(x, t, y):
        seen.append(y)
        return torch.zeros_like(x)
    loss = DiffusionLoss(diffusion, 3, p_uncond, loss=lambda fn, x0, t, noise: fn(x0, t), captions=captions)
    torch.manual_seed(seed)
    x0, y = torch.randn(16, 3, 4, 4), torch.randint(0, 3, (16,))
    t, noise, drop = loss.draw(x0, y)
    loss(model, x0, y, t, noise, drop)
    tokens = tokenize(captions, captions)
    expected = torch.where(drop[:, None], null_condition({"captions": captions}, 16, "cpu"), tokens[y])
    assert torch.equal(seen[0], expected) and (null_condition({"captions": captions}, 1, "cpu") == 0).all()
    classes = DiffusionLoss(diffusion, 3, p_uncond, loss=lambda fn, x0, t, noise: fn(x0, t))
    classes(model, x0, y, t, noise, drop)
    assert torch.equal(seen[1] == 3, drop)


def test_guidance_subtracts_the_empty_captions_prediction():
    """model_fn with guidance w on a caption model: (1 + w) eps(x, caption) - w eps(x, empty caption)."""
    net = randomized(UNet(**TINY, captions=["red disk", "blue cross"]))
    x, t = inputs(2, size=16)
    y = tokenize(["red disk", "cross"], net.captions)
    with torch.no_grad():
        guided = model_fn(net, y, 2.0)(x, t)
        torch.testing.assert_close(guided, 3 * net(x, t, y) - 2 * net(x, t), atol=1e-5, rtol=1e-4)


def test_captioned_shapes_draw_the_colour_apart_from_the_kind():
    """--data captions: the images of `shapes` with the colour drawn on its own (an image whose colour happens to be
    its kind's own is the shapes image of the same seed, pixel for pixel), all 16 captions, each about equally often,
    named colour then kind."""
    plain, kinds = make_shapes(4000, 8, 3, seed=0)
    images, labels = make_shapes(4000, 8, 3, seed=0, captions=True)
    assert torch.equal(labels % 4, kinds)
    same = labels // 4 == kinds
    assert torch.equal(images[same], plain[same]) and not torch.equal(images[~same], plain[~same])
    counts = labels.bincount(minlength=16)
    assert len(counts) == 16 and counts.min() > 4000 / 16 * 0.7
    assert CAPTIONS[4 * COLOURS.index("blue") + SHAPES_CLASSES.index("cross")] == "blue cross"


# a tiny caption model on 8x8 captioned shapes, T = 100, with cross-attention at 4x4 and in the middle
TRAIN = ["--data", "captions", "--caption-cond", "--image-size", "8", "--ch", "32", "--ch-mult", "1,2",
         "--num-res-blocks", "1", "--attn", "4", "--timesteps", "100", "--batch-size", "32", "--steps", "500",
         "--lr", "1e-3", "--warmup", "20", "--ema-decay", "0.99", "--sample-every", "500", "--num-samples", "16",
         "--sample-steps", "2", "--log-every", "100", "--device", "cpu"]


def shape_colour(images):
    """The index in COLOURS of the nearest palette hue to the mean colour of the brightest quarter of the pixels (the
    shape's; the backgrounds are darker than 40), each colour direction normalised (the shade varies)."""
    palette = torch.tensor([[230, 60, 50], [60, 200, 70], [70, 110, 240], [240, 210, 40]], dtype=torch.float32)
    x = images.flatten(1, 2).float()                                    # (N, HW, 3)
    top = x.sum(2).topk(x.shape[1] // 4, dim=1).indices
    mean = torch.gather(x, 1, top[..., None].expand(-1, -1, 3)).mean(1)
    return (torch.nn.functional.normalize(mean, dim=1) @ torch.nn.functional.normalize(palette, dim=1).T).argmax(1)


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    out = tmp_path_factory.mktemp("captions") / "run"
    r = run_script("train.py", *TRAIN, "--out", out, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def test_a_caption_model_draws_the_colour_it_is_asked_for(captioned, tmp_path):
    """The must-show of caption conditioning, at 8x8: 32 samples for each of four captions of four colours, guided
    (w = 3, 100 ancestral steps), come out in the asked-for colour at least 80% of the time (a model that ignored its
    caption: 25%); the colour reader is exact on real captioned shapes; the .npz's arr_1 is each sample's caption in
    the --caption list; the training grid has one row per caption."""
    real, labels = make_shapes(2000, 8, 3, seed=1, captions=True)
    assert (shape_colour(real) == labels // 4).float().mean() > 0.99
    asked = ["red disk", "green cross", "blue square", "yellow triangle"]
    args = [a for c in asked for a in ("--caption", c)]
    r = run_script("sample.py", captioned, "-n", "128", "--guidance", "3", "--steps", "100", "--sampler", "ddpm",
                   "--npz", tmp_path / "s.npz", "--out", tmp_path / "s.png", "--device", "cpu", *args)
    assert r.returncode == 0 and "captions ['red disk'" in r.stdout, r.stdout + r.stderr
    arrays = read_npz(tmp_path / "s.npz")
    assert arrays["arr_1"].tolist() == [k for k in range(4) for _ in range(32)]
    want = torch.tensor([COLOURS.index(c.split()[0]) for c in asked])[arrays["arr_1"]]
    accuracy = (shape_colour(arrays["arr_0"]) == want).float().mean().item()
    print(f"asked-for colour: {accuracy:.1%}")
    assert accuracy >= 0.8, accuracy
    assert (captioned / "samples_0000500.png").exists()


def test_without_a_caption_a_caption_model_samples_the_empty_caption(captioned, tmp_path):
    """sample.py without --caption draws from eps(x, empty caption), says so, and stores no arr_1; its samples are
    not those of a caption (the same seed)."""
    said = {}
    for name, extra in (("empty", []), ("red", ["--caption", "red disk"])):
        r = run_script("sample.py", captioned, "-n", "4", "--steps", "5", "--sampler", "ddim", "--device", "cpu",
                       "--npz", tmp_path / f"{name}.npz", "--out", tmp_path / f"{name}.png", *extra)
        assert r.returncode == 0, r.stdout + r.stderr
        said[name] = r.stdout
    note = "caption model and no --caption: unconditional samples (the empty caption)"
    assert note in said["empty"] and note not in said["red"]
    empty, red = read_npz(tmp_path / "empty.npz"), read_npz(tmp_path / "red.npz")
    assert list(empty) == ["arr_0"] and not torch.equal(empty["arr_0"], red["arr_0"])


def test_bad_caption_input_is_one_line(captioned, tmp_path, capsys):
    """An unknown word, too many words, an empty caption, --class or --classifier for a caption model, --caption for
    another model, --guidance without a caption, exporting a caption model to diffusers' UNet2DModel (no folder
    left behind); resuming a caption model on data of other class names, distilling it; --caption-cond on data
    without class names or with --class-cond: one line each."""
    import runs
    import train
    for extra, expect in [(["--caption", "purple disk"], "the model knows no 'purple' (its words: blue, cross,"),
                          (["--caption", "red red disk"], "3 words; the model's captions have at most 2"),
                          (["--class", "1"], "a caption model is told what to draw by --caption"),
                          (["--guidance", "2"], "--guidance needs --class and a class-conditional model, or "
                                                "--caption and a caption model"),
                          (["--caption", " "], "the empty caption is the null condition; leave --caption out")]:
        r = run_script("sample.py", captioned, "-n", "1", "--steps", "2", "--sampler", "ddim", "--device", "cpu",
                       "--out", tmp_path / "g.png", *extra)
        assert expect in assert_one_line_error(r), extra
    r = run_script("export.py", captioned, "--to-diffusers", tmp_path / "d")
    assert "a caption model's cross-attention and caption encoder have no place" in assert_one_line_error(r)
    assert not (tmp_path / "d").exists()
    plain = tmp_path / "plain"
    assert run_script("train.py", *TRAIN_TINY, "--steps", "1", "--out", plain).returncode == 0
    r = run_script("sample.py", plain, "-n", "1", "--steps", "2", "--device", "cpu", "--out", tmp_path / "g.png",
                   "--caption", "red disk")
    assert "--caption needs a caption model (train.py --caption-cond); this model takes no condition" in \
        assert_one_line_error(r)
    args, ckpt, kind, _ = train.parse(["--resume", str(captioned)])
    with pytest.raises(ValueError, match="the data's class names are not the caption model's 16 captions"):
        runs.build_run(kind, args, ckpt, make_shapes(8, 8, 3)[0], 12, torch.device("cpu"), CAPTIONS[:12])
    assert "is a caption model: distillation here learns a teacher's unconditional steps" in one_line_error(
        train.main, ["--distill", "progressive", "--teacher", str(captioned), "--data", "captions", "--image-size", "8",
                     "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "pd")], capsys)
    images = tmp_path / "images.pt"
    torch.save(make_shapes(16, 8, 3)[0], images)
    for extra, expect in [(["--data", str(images)], "--caption-cond needs labelled data with class names"),
                          (["--class-cond"], "--caption-cond conditions a diffusion model on captions: not with")]:
        assert expect in one_line_error(train.main, [*TRAIN_TINY, "--caption-cond", "--steps", "1", "--out",
                                                     str(tmp_path / "x"), *extra], capsys), extra
