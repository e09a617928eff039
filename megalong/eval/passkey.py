"""Passkey retrieval, LongLoRA-style: a random 5-digit key hidden at a chosen depth in repeated
filler text, then the question; greedy decoding; correct only if the first number the model
generates is exactly the key.

The prompt builder and the scorer are pure functions (no torch):
    prompt = fit_passkey_prompt(tokenizer.encode, target_tokens=4096, depth=0.5, key="48213")
    passkey_correct(generated_text, prompt.key)

Prompt layout (as LongLoRA's passkey_retrivial.py; filler counted in whole sentences):
    task description \\n filler (depth share) \\n key line \\n filler (the rest) \\n question
"""

import random
import re
from dataclasses import dataclass
from typing import Callable, Optional

from megalong.errors import MegalongError


TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
        "them. I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
FILLER_SENTENCES = tuple(s.strip() + "." for s in FILLER.split(".") if s.strip())
QUESTION = "What is the pass key? The pass key is"


def key_line(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def filler(num_sentences: int) -> str:
    """The first num_sentences sentences of the filler text repeated."""
    count = len(FILLER_SENTENCES)
    return " ".join(FILLER_SENTENCES[i % count] for i in range(num_sentences))


def random_key(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


@dataclass(frozen=True)
class PasskeyPrompt:
    text: str
    key: str
    filler_before: int  # filler sentences before the key line
    filler_after: int

    @property
    def depth(self) -> float:
        """Where the key sits in the filler: 0 at its start, 1 at its end."""
        total = self.filler_before + self.filler_after
        return self.filler_before / total if total else 0.0

    @property
    def key_offset(self) -> int:
        """Character offset of the key line in the text."""
        return self.text.index(key_line(self.key))


def build_passkey_prompt(key: str, filler_before: int, filler_after: int) -> PasskeyPrompt:
    if not (key.isdigit() and len(key) == 5):
        raise MegalongError(f"the pass key must be 5 digits, got {key!r}")
    if filler_before < 0 or filler_after < 0:
        raise MegalongError("filler sentence counts must be >= 0")
    parts = [TASK, filler(filler_before), key_line(key), filler(filler_after), QUESTION]
    return PasskeyPrompt("\n".join(p for p in parts if p), key, filler_before, filler_after)


def fit_passkey_prompt(encode: Callable[[str], list], target_tokens: int, depth: float, key: str,
                       *, extra_tokens: int = 1) -> PasskeyPrompt:
    """The longest prompt whose encoding plus `extra_tokens` (BOS) fits target_tokens, with the
    key after round(depth × n) of its n filler sentences."""
    if not 0.0 <= depth <= 1.0:
        raise MegalongError(f"depth must lie in [0, 1], got {depth}")

    def build(total: int) -> PasskeyPrompt:
        before = round(depth * total)
        return build_passkey_prompt(key, before, total - before)

    def fits(total: int) -> bool:
        return len(encode(build(total).text)) + extra_tokens <= target_tokens

    if not fits(0):
        shortest = len(encode(build(0).text)) + extra_tokens
        raise MegalongError(f"passkey length {target_tokens} is shorter than the prompt without "
                            f"filler ({shortest} tokens); use lengths of at least {shortest + 16}")
    low, high = 0, 1
    while fits(high):  # tokens grow with the filler: double, then bisect
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return build(low)


def generated_number(text: str) -> Optional[str]:
    """The first run of digits in the generated text, or None."""
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


def passkey_correct(generated_text: str, key: str) -> bool:
    """Exact match: the first number generated is the key (no more, no fewer digits)."""
    return generated_number(generated_text) == key


# ---------------------------------------------------------------- the sweep


@dataclass(frozen=True)
class PasskeyCase:
    length: int
    depth: float
    trial: int
    key: str


def sweep_cases(lengths, depths, trials: int, seed: int) -> list[PasskeyCase]:
    """Every (length, depth, trial) with its key; keys depend only on the seed and the case."""
    cases = []
    for length in lengths:
        for depth in depths:
            for trial in range(trials):
                rng = random.Random(f"{seed}/{length}/{depth}/{trial}")
                cases.append(PasskeyCase(length, depth, trial, random_key(rng)))
    return cases


def summarize(records: list[dict], lengths, depths) -> dict:
    """Accuracy per length (over all depths and trials) and the depth x length grid."""
    def accuracy(rows):
        return sum(r["correct"] for r in rows) / len(rows) if rows else None

    by_length = {str(L): accuracy([r for r in records if r["length"] == L]) for L in lengths}
    grid = [[accuracy([r for r in records if r["length"] == L and r["depth"] == d])
             for L in lengths] for d in depths]
    return {"accuracy_by_length": by_length, "grid": grid,
            "accuracy": accuracy(records)}
