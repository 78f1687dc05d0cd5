#!/usr/bin/env python3
"""A BitNet b1.58 forward pass in numpy that writes a divergence dump.

A candidate engine in another language, plugged in the out-of-process way:
run it, write every canonical stage of every step into one safetensors file
(tensor names step{S}.layer{L}.{stage} / step{S}.{stage}, f32, canonical
layouts of docs/candidate-api.md), then

    divergence capture --model M --tokens IDS --steps N --out ref.safetensors
    python3 bitnet_numpy.py --model M --tokens IDS --steps N --out cand.safetensors
    divergence compare --reference ref.safetensors --candidate cand.safetensors --model M

It reads the GGUF and the I2_S tensors with its own code (the PyPI `gguf`
reader does not know type 36) and needs only numpy and safetensors.

Planted bugs (`--bug`), each of which `compare` must find at its stage:
  rope-pairs     RoPE on adjacent pairs instead of NEOX halves (q_rope)
  eps-hardcoded  RMSNorm eps 1e-6 whatever the file says (attn_norm; NMSE ~1e-9)
  act-scale128   activation scale 128/absmax instead of 127 (q_proj; NMSE ~1e-4)
`--bug-layer L` plants it in layer L only.

Honest variants that must stay clean: `--rope-style hf` computes RoPE as
Hugging Face does (inverse frequencies by pow, angle = pos * inv_freq in
f32, no FMA) instead of mirroring ggml.

What it emits: `--stages l_out,result_norm,logits` writes only those stages
(and declares them in the manifest), `--last-logits` only the last position's
logits row, `--stages none` only the tokens (a black-box engine).
"""

import argparse
import hashlib
import json
import struct
import sys

import numpy as np
from safetensors.numpy import save_file

F32, F16, I2S = 0, 1, 36


class Gguf:
    """Just enough of GGUF v2/v3: metadata, tensor table, tensor bytes."""

    def __init__(self, path):
        with open(path, "rb") as f:
            self.buf = f.read()
        self.pos = 0
        if self.buf[:4] != b"GGUF":
            raise SystemExit(f"{path}: not a GGUF file")
        self.pos = 4
        version = self.u32()
        if version not in (2, 3):
            raise SystemExit(f"{path}: GGUF version {version} is not supported")
        n_tensors, n_kv = self.u64(), self.u64()
        self.meta = {}
        for _ in range(n_kv):
            key = self.string()
            self.meta[key] = self.value(self.u32())
        self.tensors = {}
        for _ in range(n_tensors):
            name = self.string()
            dims = [self.u64() for _ in range(self.u32())]
            ty, offset = self.u32(), self.u64()
            self.tensors[name] = (dims, ty, offset)
        align = self.meta.get("general.alignment", 32)
        self.data = (self.pos + align - 1) // align * align

    def take(self, fmt):
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def u32(self):
        return self.take("I")

    def u64(self):
        return self.take("Q")

    def string(self):
        n = self.u64()
        s = self.buf[self.pos:self.pos + n].decode("utf-8", "replace")
        self.pos += n
        return s

    def value(self, ty):
        scalars = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
        if ty in scalars:
            return self.take(scalars[ty])
        if ty == 8:
            return self.string()
        if ty == 9:
            inner, n = self.u32(), self.u64()
            return [self.value(inner) for _ in range(n)]
        raise SystemExit(f"unknown GGUF value type {ty}")

    def raw(self, name):
        dims, ty, offset = self.tensors[name]
        n = int(np.prod(dims))
        size = {F32: 4 * n, F16: 2 * n, I2S: n // 4 + 32}.get(ty)
        if size is None:
            raise SystemExit(f"{name}: tensor type {ty} is not supported")
        start = self.data + offset
        return dims, ty, self.buf[start:start + size]

    def floats(self, name):
        dims, ty, raw = self.raw(name)
        dt = np.float32 if ty == F32 else np.float16
        return np.frombuffer(raw, dtype=dt).astype(np.float32).reshape(dims[::-1]), ty

    def ternary(self, name):
        """I2_S: 128-value blocks, value j of a block in byte j % 32 at shift
        6 - 2 (j // 32); codes 0, 1, 2 mean -1, 0, +1; then one f32 scale."""
        dims, ty, raw = self.raw(name)
        if ty != I2S:
            raise SystemExit(f"{name} is not I2_S")
        n_in, n_out = dims[0], dims[1]
        n = n_in * n_out
        codes = np.frombuffer(raw[: n // 4], dtype=np.uint8).reshape(-1, 32)
        groups = [(codes >> (6 - 2 * g)) & 3 for g in range(4)]
        values = np.concatenate(groups, axis=1).astype(np.int32) - 1  # [blocks, 128]
        scale = struct.unpack_from("<f", raw, n // 4)[0]
        return values.reshape(n_out, n_in), np.float32(scale)


def rms_norm(x, w, eps):
    """ggml: squares in f32 summed in f64, mean as f32, 1/sqrtf(mean + eps),
    x * scale, then * w."""
    sq = (x * x).astype(np.float64).sum(axis=-1, keepdims=True)
    mean = (sq / x.shape[-1]).astype(np.float32)
    scale = (np.float32(1.0) / np.sqrt(mean + np.float32(eps))).astype(np.float32)
    return ((x * scale) * w).astype(np.float32)


def linear(w, w_scale, x, extra=None, numerator=127.0):
    """bitnet.cpp's I2_S product: int8 codes of each row (exact product,
    ties to even), an integer dot, then (Σ) / act_scale * w_scale in f32."""
    mx = np.maximum(np.abs(x.astype(np.float64)).max(axis=-1, keepdims=True), 1e-5)
    s = (numerator / mx).astype(np.float32)
    q = np.clip(np.rint(x.astype(np.float64) * s.astype(np.float64)), -128, 127).astype(np.int64)
    acc = q @ w.T.astype(np.int64)  # exact
    y = (acc.astype(np.float32) / s) * w_scale
    if extra is not None:
        y = y * extra
    return y.astype(np.float32)


def fma32(a, b, c):
    """a*b + c rounded once to f32 (the FMA ggml's RoPE compiles to): the
    f32 product is exact in f64; one f64 addition, then one rounding."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def rope_hf(x, pos0, base, neox):
    """[T, heads, hd] as Hugging Face computes it: inv_freq = 1 / base^(2i/d)
    in f32, angle = pos * inv_freq in f32, cos and sin in f32, no FMA."""
    t, _, hd = x.shape
    inv = (np.float32(1.0) / (np.float32(base) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))).astype(np.float32)
    out = x.copy()
    for ti in range(t):
        ang = (np.float32(pos0 + ti) * inv).astype(np.float32)
        cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        if neox:
            a, b = x[ti, :, : hd // 2], x[ti, :, hd // 2:]
        else:
            a, b = x[ti, :, 0::2], x[ti, :, 1::2]
        ra = (a * cos - b * sin).astype(np.float32)
        rb = (a * sin + b * cos).astype(np.float32)
        if neox:
            out[ti, :, : hd // 2], out[ti, :, hd // 2:] = ra, rb
        else:
            out[ti, :, 0::2], out[ti, :, 1::2] = ra, rb
    return out


def rope(x, pos0, base, neox):
    """[T, heads, hd] at positions pos0..; ggml's angle table: theta starts at
    the position and is multiplied by base^(-2/d) once per pair, in f32."""
    t, _, hd = x.shape
    theta_scale = np.float32(np.float32(base) ** np.float32(-2.0 / hd))
    out = x.copy()
    for ti in range(t):
        theta = np.float32(pos0 + ti)
        cos, sin = np.empty(hd // 2, np.float32), np.empty(hd // 2, np.float32)
        for i in range(hd // 2):
            cos[i], sin[i] = np.cos(theta), np.sin(theta)
            theta = np.float32(theta * theta_scale)
        if neox:
            a, b = x[ti, :, : hd // 2], x[ti, :, hd // 2:]
        else:
            a, b = x[ti, :, 0::2], x[ti, :, 1::2]
        ra = fma32(a, cos, -(b * sin))
        rb = fma32(a, sin, b * cos)
        if neox:
            out[ti, :, : hd // 2], out[ti, :, hd // 2:] = ra, rb
        else:
            out[ti, :, 0::2], out[ti, :, 1::2] = ra, rb
    return out


def f16(x):
    return x.astype(np.float16).astype(np.float32)


class Engine:
    def __init__(self, path, kv_f16, bug, bug_layer=None, rope_style="ggml", ffn_act="auto"):
        g = Gguf(path)
        arch = g.meta["general.architecture"]
        if arch not in ("bitnet", "bitnet-b1.58", "bitnet-25", "llama"):
            raise SystemExit(f"arch {arch} is not supported")
        k = lambda s: g.meta[f"{arch}.{s}"]
        self.arch, self.kv_f16, self.bug = arch, kv_f16, bug
        self.bug_layer, self.rope_style, self.ffn_act = bug_layer, rope_style, ffn_act
        self.n_embd, self.n_layer = k("embedding_length"), k("block_count")
        self.n_head = k("attention.head_count")
        self.n_head_kv = g.meta.get(f"{arch}.attention.head_count_kv", self.n_head)
        self.n_ff = k("feed_forward_length")
        self.eps = k("attention.layer_norm_rms_epsilon")
        self.theta = g.meta.get(f"{arch}.rope.freq_base", 10000.0)
        self.hd = self.n_embd // self.n_head
        self.embd, _ = g.floats("token_embd.weight")
        out_name = "output.weight" if "output.weight" in g.tensors else "token_embd.weight"
        self.output, out_ty = g.floats(out_name)
        self.output_f16 = out_ty == F16
        self.output_norm, _ = g.floats("output_norm.weight")
        self.layers = []
        for l in range(self.n_layer):
            def proj(s):
                w, sc = g.ternary(f"blk.{l}.{s}.weight")
                extra = None
                if f"blk.{l}.{s}.scale" in g.tensors:
                    extra = g.floats(f"blk.{l}.{s}.scale")[0].reshape(-1)[0]
                return w, sc, extra
            norm = lambda s: g.floats(f"blk.{l}.{s}.weight")[0]
            sub = arch != "llama"
            self.layers.append({
                "attn_norm": norm("attn_norm"), "ffn_norm": norm("ffn_norm"),
                "attn_sub_norm": norm("attn_sub_norm") if sub else None,
                "ffn_sub_norm": norm("ffn_sub_norm") if sub else None,
                **{p: proj(s) for p, s in [("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"),
                                           ("o", "attn_output"), ("gate", "ffn_gate"),
                                           ("up", "ffn_up"), ("down", "ffn_down")]},
            })
        self.k_cache = [np.zeros((0, self.n_head_kv * self.hd), np.float32) for _ in range(self.n_layer)]
        self.v_cache = [np.zeros((0, self.n_head_kv * self.hd), np.float32) for _ in range(self.n_layer)]

    def planted(self, bug, layer):
        return self.bug == bug and (self.bug_layer is None or self.bug_layer == layer)

    def forward(self, tokens, pos0, emit):
        e, hd, nh, nkv = self.n_embd, self.hd, self.n_head, self.n_head_kv
        t = len(tokens)
        x = self.embd[np.array(tokens)]
        emit(None, "tok_embd", x)
        store = f16 if self.kv_f16 else (lambda v: v)
        rotate = rope_hf if self.rope_style == "hf" else rope
        for l, w in enumerate(self.layers):
            neox = (self.arch != "llama") != self.planted("rope-pairs", l)
            eps = 1e-6 if self.planted("eps-hardcoded", l) else self.eps
            num = 128.0 if self.planted("act-scale128", l) else 127.0
            cur = rms_norm(x, w["attn_norm"], eps)
            emit(l, "attn_norm", cur)
            q, k, v = (linear(*w[p][:2], cur, w[p][2], num) for p in ("q", "k", "v"))
            emit(l, "q_proj", q); emit(l, "k_proj", k); emit(l, "v_proj", v)
            q = rotate(q.reshape(t, nh, hd), pos0, self.theta, neox).reshape(t, e)
            emit(l, "q_rope", q)
            k = rotate(k.reshape(t, nkv, hd), pos0, self.theta, neox).reshape(t, nkv * hd)
            emit(l, "k_rope", k)
            self.k_cache[l] = np.concatenate([self.k_cache[l], store(k)])
            self.v_cache[l] = np.concatenate([self.v_cache[l], store(v)])
            n_keys = pos0 + t
            kc = self.k_cache[l].reshape(n_keys, nkv, hd)
            vc = self.v_cache[l].reshape(n_keys, nkv, hd)
            qh = store(q).reshape(t, nh, hd)
            group = nh // nkv
            scores = np.zeros((nh, t, n_keys), np.float32)
            for h in range(nh):
                scores[h] = qh[:, h, :] @ kc[:, h // group, :].T
            mask = np.arange(n_keys)[None, :] > (pos0 + np.arange(t))[:, None]
            scores = np.where(mask[None], np.float32(0), scores).astype(np.float32)
            emit(l, "attn_scores", scores)
            scaled = scores * np.float32(1.0 / np.sqrt(hd))
            scaled = np.where(mask[None], -np.inf, scaled)
            ex = np.exp(scaled - scaled.max(axis=-1, keepdims=True)).astype(np.float32)
            probs = (ex * (1.0 / ex.astype(np.float64).sum(axis=-1, keepdims=True)).astype(np.float32))
            emit(l, "attn_probs", probs.astype(np.float32))
            p_in = f16(probs) if (self.kv_f16 and t == 1) else probs
            attn = np.zeros((t, nh, hd), np.float32)
            for h in range(nh):
                attn[:, h, :] = p_in[h] @ vc[:, h // group, :]
            attn = attn.reshape(t, e)
            emit(l, "attn_out", attn)
            if w["attn_sub_norm"] is not None:
                attn = rms_norm(attn, w["attn_sub_norm"], eps)
                emit(l, "attn_sub_norm", attn)
            o = linear(*w["o"][:2], attn, w["o"][2], num)
            emit(l, "o_proj", o)
            ffn_inp = (o + x).astype(np.float32)
            emit(l, "ffn_inp", ffn_inp)
            cur = rms_norm(ffn_inp, w["ffn_norm"], eps)
            emit(l, "ffn_norm", cur)
            gate = linear(*w["gate"][:2], cur, w["gate"][2], num)
            emit(l, "ffn_gate", gate)
            if self.ffn_act == "relu2" or (self.ffn_act == "auto" and self.arch in ("bitnet-b1.58", "bitnet-25")):
                act = (np.maximum(gate, 0) ** 2).astype(np.float32)
            else:
                act = (gate / (np.float32(1) + np.exp(-gate))).astype(np.float32)
            emit(l, "ffn_act", act)
            up = linear(*w["up"][:2], cur, w["up"][2], num)
            emit(l, "ffn_up", up)
            prod = (act * up).astype(np.float32)
            emit(l, "ffn_mul", prod)
            if w["ffn_sub_norm"] is not None:
                prod = rms_norm(prod, w["ffn_sub_norm"], eps)
                emit(l, "ffn_sub_norm", prod)
            down = linear(*w["down"][:2], prod, w["down"][2], num)
            emit(l, "ffn_down", down)
            x = (down + ffn_inp).astype(np.float32)
            emit(l, "l_out", x)
        h = rms_norm(x, self.output_norm, self.eps)
        emit(None, "result_norm", h)
        hin = f16(h) if (self.output_f16 and t == 1) else h
        logits = (hin @ self.output.T).astype(np.float32)
        emit(None, "logits", logits)
        return logits


STAGES = ["tok_embd", "attn_norm", "q_proj", "k_proj", "v_proj", "q_rope", "k_rope",
          "attn_scores", "attn_probs", "attn_out", "attn_sub_norm", "o_proj", "ffn_inp",
          "ffn_norm", "ffn_gate", "ffn_act", "ffn_up", "ffn_mul", "ffn_sub_norm", "ffn_down",
          "l_out", "result_norm", "logits"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", required=True, help="comma-separated prompt ids")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--kv", choices=["f16", "f32"], default="f16")
    ap.add_argument("--bug", choices=["none", "rope-pairs", "eps-hardcoded", "act-scale128"], default="none")
    ap.add_argument("--bug-layer", type=int, default=None, help="plant the bug in this layer only")
    ap.add_argument("--rope-style", choices=["ggml", "hf"], default="ggml")
    ap.add_argument("--ffn-act", choices=["auto", "relu2", "silu"], default="auto",
                    help="the FFN activation: auto as the arch defines it (bitnet-b1.58, bitnet-25: squared ReLU; bitnet, llama: SiLU)")
    ap.add_argument("--stages", default="all",
                    help="comma-separated stages to write (default all; none: tokens only)")
    ap.add_argument("--last-logits", action="store_true", help="write only the last position's logits")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    try:
        tokens = [int(t) for t in a.tokens.split(",")]
    except ValueError:
        raise SystemExit("--tokens must be comma-separated integers")
    if a.stages == "all":
        wanted = None
    elif a.stages == "none":
        wanted = []
    else:
        wanted = [s for s in a.stages.split(",") if s]
        unknown = [s for s in wanted if s not in STAGES]
        if unknown:
            raise SystemExit(f"unknown stages {unknown}")
    eng = Engine(a.model, a.kv == "f16", a.bug, a.bug_layer, a.rope_style, a.ffn_act)
    tensors, steps, pos = {}, [], 0
    batch = tokens
    for step in range(a.steps + 1):
        def emit(layer, stage, value, step=step):
            if wanted is not None and stage not in wanted:
                return
            if stage == "logits" and a.last_logits:
                value = value[-1:]
            name = f"step{step}.{stage}" if layer is None else f"step{step}.layer{layer}.{stage}"
            tensors[name] = np.ascontiguousarray(value, dtype=np.float32)
        logits = eng.forward(batch, pos, emit)
        steps.append({"step": step, "pos0": pos, "tokens": batch})
        pos += len(batch)
        batch = [int(np.argmax(logits[-1]))]
    with open(a.model, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    manifest = {
        "tool": "examples/python/bitnet_numpy.py",
        "engine": "numpy example engine",
        "engine_build": f"numpy {np.__version__}, float32, RoPE {a.rope_style}, bug {a.bug}"
        + (f" in layer {a.bug_layer}" if a.bug_layer is not None else ""),
        "model_path": a.model, "model_sha256": sha, "model": None, "engine_config": None,
        "steps": steps, "mode": "free", "threads": 1, "kv_type": a.kv, "reference_build": None,
    }
    if wanted is not None:
        manifest["stages"] = wanted
    save_file(tensors, a.out, metadata={"divergence": json.dumps(manifest)})
    print(f"dump {a.out}: {len(tensors)} tensors, {len(steps)} steps")


if __name__ == "__main__":
    sys.exit(main())
