"""Builds the tiny Hugging Face reference models and their transformers outputs under tests/fixtures/hf/.

Run with an environment that has torch (not a jaxsr dependency):
    pip install torch==2.13.0 transformers tokenizers safetensors numpy
    python scripts/make_hf_fixtures.py

For every family jaxsr supports it writes a random tiny model (config.json, model.safetensors,
generation_config.json, tokenizer files) and `reference.npz` with:
  input_ids, attention_mask   a left-padded batch,
  logits                      transformers' float32 logits for it (eager attention),
  greedy_prompt_{i}, greedy_{i}  prompts and transformers' greedy continuations (no EOS stop),
  greedy_margin               the smallest top-1 minus top-2 logit gap met during greedy decoding.
The models use a larger init std than usual so greedy choices are not near-ties.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "hf"

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CORPUS = [
    "Write a short poem about the sea. Answer in lowercase.",
    "List three colors, one per line. Score: 4",
    "The quick brown fox jumps over the lazy dog.",
    "Explain why the sky is blue in two sentences.",
    "Respond with exactly five words, all in uppercase.",
    "Review the user's question and the corresponding response using the additive 5-point scoring system.",
] * 4

BASE = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=128,
            rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
FAMILIES = {
    "llama2": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0),
    "llama3": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 16}),
    "llama_linear_bias": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=1, rope_theta=10000.0,
                              rope_scaling={"rope_type": "linear", "factor": 2.0}, attention_bias=True, mlp_bias=True,
                              tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                    sliding_window=5),
    "qwen2": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, rope_theta=1000000.0,
                  tie_word_embeddings=True, use_sliding_window=False),
    "qwen3": dict(model_type="qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1000000.0,
                  tie_word_embeddings=False, use_sliding_window=False),
}


def make_tokenizer(out: Path) -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(
        vocab_size=310, min_frequency=2, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=SPECIALS[4:])
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return tok


def config_for(name: str):
    spec = dict(BASE, **FAMILIES[name])
    model_type = spec.pop("model_type")
    return transformers.AutoConfig.for_model(model_type, **spec)


def greedy(model, ids: list[int], steps: int) -> tuple[list[int], float]:
    out, margin = [], float("inf")
    x = torch.tensor([ids])
    with torch.no_grad():
        gen = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=steps,
                             eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    for s in gen.scores:
        top2 = torch.topk(s[0], 2).values
        margin = min(margin, float(top2[0] - top2[1]))
    out = gen.sequences[0, len(ids):].tolist()
    return out, margin


def build(name: str, tok, seed: int) -> dict:
    torch.manual_seed(seed)
    cfg = config_for(name)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    out = OUT / name
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    rng = np.random.RandomState(seed)
    B, T = 4, 12
    ids = rng.randint(3, cfg.vocab_size, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, :3] = 0  # left padding, as the sampler batches prompts
    mask[2, :7] = 0
    ids[mask == 0] = 0
    with torch.no_grad():
        logits = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()
    ref = {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32), "logits": logits.astype(np.float32)}
    margins = []
    prompts = [tok.encode("Write a short poem"), tok.encode("List three colors, one per line."), [5, 9]]
    for i, p in enumerate(prompts):
        g, m = greedy(model, p, 20)
        ref[f"greedy_prompt_{i}"] = np.array(p, np.int32)
        ref[f"greedy_{i}"] = np.array(g, np.int32)
        margins.append(m)
    ref["greedy_margin"] = np.array(min(margins), np.float32)
    np.savez_compressed(out / "reference.npz", **ref)
    return {"name": name, "seed": seed, "greedy_margin": min(margins),
            "params": sum(p.numel() for p in model.parameters())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="families to rebuild (default: all)")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    tok_dir = OUT.parent / "tokenizer"
    tok = make_tokenizer(tok_dir)
    for i, name in enumerate(args.only or FAMILIES):
        info = build(name, tok, seed=1000 + i)
        print(json.dumps(info))
    print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__}))


if __name__ == "__main__":
    main()
