"""Train the world's small byte-level BPE tokenizer and save it to jaxsr/world/tokenizer/.

    .venv/bin/python scripts/make_world_tokenizer.py [--out DIR] [--vocab-size 1024] [--seed 0]

Byte-level, so any text (a model's odd generation, a Self-Instruct prompt) round-trips exactly, but
trained only on world text, so a world instruction is ~16 tokens and every list word, in each case and
with or without a leading space, is one token: 1,024 tokens are exactly what training saturates at
(256 bytes, 7 specials, and BPE's merges, many of them intermediate pieces of the 288 word forms).
The output is committed; rerun this only when the world's vocabulary changes. Deterministic: the same
world seed gives the same tokenizer.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from jaxsr.world import TOKENIZER_DIR, TOPICS, world_records
from jaxsr.world.tasks import CHATTER

ROLE_TOKENS = ["<|user|>", "<|assistant|>", "<|end|>"]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", *ROLE_TOKENS]
# The model's turn ends with <|end|>, so that is the EOS generation stops on.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def corpus(seed: int) -> list[str]:
    """World text: every split's strings, plus each list word in each case and position."""
    records = world_records(seed)
    texts = [r["prompt"] for r in records["ift"]] + [r["response"] for r in records["ift"]]
    texts += [r["prompt"] for r in records["eft"]] + [r["response"] for r in records["eft"]]
    texts += [c for r in records["rm_eval"] for c in r["candidates"]]
    # Every list word in every case, at a line start and after a space, repeated so BPE merges each
    # form into one token: choosing a word (and its case) is then a single prediction for the model.
    words = [w for ws in TOPICS.values() for w in ws]
    forms = [f for w in words for f in (w, w.upper(), w.capitalize())]
    texts += ["\n".join(forms) + "\n" + " ".join(forms)] * 20
    texts += list(CHATTER) * 20
    # The Self-Instruct few-shot prompt (jaxsr/templates/selfinstruct.txt) is the other text the model reads.
    texts += ["Come up with a series of tasks:\n" + "\n".join(f"Task {i}: {r['prompt']}" for i, r in
                                                            enumerate(records["seed_prompts"][j:j + 8], 1))
              for j in range(0, 800, 8)]
    return texts


def train(seed: int = 0, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.BPE(unk_token=None))  # byte-level: nothing is ever unknown
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus(seed), trainer=trainer)
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=ROLE_TOKENS)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=TOKENIZER_DIR)
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    tok = train(args.seed, args.vocab_size)
    tok.save_pretrained(str(args.out))
    print(f"saved {len(tok)} tokens (eos {tok.eos_token!r} = {tok.eos_token_id}) to {args.out}")


if __name__ == "__main__":
    main()
