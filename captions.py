"""
Caption conditioning, latent diffusion's (Rombach, Blattmann, Lorenz, Esser, Ommer 2022, arXiv:2112.10752,
Sec. 3.3): a caption's tokens through a transformer tau_theta, read by cross-attention after every self-attention of
the U-Net of unet.py (CaptionUNet, which fills unet.UNet's two hooks; the paper's net is untouched), and the
one-word-one-token tokenizer of a model's training captions. The state_dict keys are the U-Net's plus
caption_encoder.* and each attention's cross.*.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from unet import Normalize, UNet


class CrossAttention(nn.Module):
    """Latent diffusion's conditioning (Rombach et al. 2022, Sec. 3.3): Attention(Q, K, V) = softmax(Q K^T / sqrt(C)) V
    with Q = W_Q phi(z_t) from the image's H*W positions and K = W_K tau(y), V = W_V tau(y) from the caption's L
    tokens; single-head like AttnBlock, residual, its output layer starting at ~0 (reset_parameters)."""

    def __init__(self, channels, context_dim):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(context_dim, channels)
        self.v = nn.Linear(context_dim, channels)
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        h = F.scaled_dot_product_attention(self.q(h)[:, None], self.k(context)[:, None], self.v(context)[:, None])
        return x + self.proj_out(h[:, 0]).transpose(1, 2).reshape(B, C, H, W)


def caption_words(captions):
    """A caption model's vocabulary and caption length from its training captions: [""] + the sorted words (token 0
    pads every caption to the length, so the empty caption, all padding, is the null condition, as "" is in
    classifier-free guided text-to-image models), and the most words of one caption."""
    words = [c.lower().split() for c in captions]
    return [""] + sorted({w for ws in words for w in ws}), max(len(ws) for ws in words)


def tokenize(texts, captions):
    """Token ids (N, L) of the texts for a model trained on these captions: a word's index in the vocabulary, then 0s.
    A word the captions never use, or more words than the longest caption, is a ValueError. (A deviation: one token
    a word, over the training captions' words; the paper's text-to-image model uses BERT's tokenizer.)"""
    vocab, length = caption_words(captions)
    ids = []
    for text in texts:
        words = text.lower().split()
        for w in words:
            if w not in vocab:
                raise ValueError(f"caption {text!r}: the model knows no {w!r} (its words: {', '.join(vocab[1:])})")
        if len(words) > length:
            raise ValueError(f"caption {text!r}: {len(words)} words; the model's captions have at most {length}")
        ids.append([vocab.index(w) for w in words] + [0] * (length - len(words)))
    return torch.tensor(ids, dtype=torch.long).reshape(len(texts), length)


class CaptionEncoder(nn.Module):
    """tau_theta of latent diffusion (Rombach et al. 2022, Sec. 3.3), trained with the U-Net: token plus learned
    position embeddings through pre-norm transformer layers -> (B, L, dim), the keys and values of every
    CrossAttention. Padding is attended to, not masked, so every caption, the empty one too, has the same length."""

    def __init__(self, vocab_size, length, dim, layers=2, heads=4):
        super().__init__()
        self.token = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.zeros(length, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.layers = nn.ModuleList([layer] + [copy.deepcopy(layer) for _ in range(layers - 1)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens):
        h = self.token(tokens) + self.position
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)


class CaptionUNet(UNet):
    """eps_theta(x_t, t, tau_theta(y)): unet.UNet (every argument of it) whose y is a caption's tokens (tokenize), read
    by a CaptionEncoder and a CrossAttention after each self-attention (an extension). captions: the training captions,
    e.g. ["red disk", ...], which fix the words and the length of a caption; None: the plain U-Net."""

    def build_condition(self, temb_ch, captions=None):
        """UNet's hook, called in its __init__ after the class embedding: the caption encoder, in the place its weights
        have always had."""
        if not (captions is None or isinstance(captions, (list, tuple)) and len(captions) > 0
                and all(isinstance(c, str) and c.split() for c in captions)):
            raise ValueError("captions must be None or a non-empty list of captions, each with a word")
        if self.num_classes is not None and captions is not None:
            raise ValueError("a model takes class labels or captions, not both")
        self.captions, self.caption_encoder = captions and list(captions), None
        if not captions:
            return None
        self.config["captions"] = list(captions)
        vocab, length = caption_words(captions)
        self.caption_encoder = CaptionEncoder(len(vocab), length, temb_ch)
        return temb_ch

    def cross_attention(self, channels, context_dim):
        return CrossAttention(channels, context_dim) if context_dim else None

    def forward(self, x, t, y=None):
        """y: (B, L) tokens of a caption each, or None: the empty caption (all padding), the null condition."""
        if self.caption_encoder is None:
            return super().forward(x, t, y)
        t = t if t.dim() else t.expand(x.shape[0])
        empty = torch.zeros(t.shape[0], self.caption_encoder.position.shape[0], dtype=torch.long, device=t.device)
        temb, context = self.embed(t), self.caption_encoder(empty if y is None else y)
        return self.decode(*self.encode(x, temb, context), temb, context)
