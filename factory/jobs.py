"""What to make: prompts (a file, or categories x templates), seeds, and deterministic sample ids."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

# Hard edges for matting: the categories the paper's data is thin on.
DEFAULT_CATEGORIES = (
    "a person with long wavy hair",
    "a fluffy long-haired cat, fur",
    "a bird with soft feathers",
    "a potted fern with thin leaves, foliage",
    "a clear glass wine glass",
    "a wisp of grey smoke",
    "a wire mesh basket",
    "a tangle of thin copper wires",
    "a clear plastic water bottle",
)
DEFAULT_TEMPLATES = (
    "{category}, centred, studio photo, sharp focus",
    "{category}, product photograph, soft light, high detail",
)
MAX_PROMPT_CHARS = 2000
MAX_PROMPTS = 1_000_000


class JobError(ValueError):
    """Bad prompts, categories, templates or seeds."""


@dataclass(frozen=True)
class Job:
    id: str
    prompt: str
    seed: int
    index: int  # which sample of its prompt


def _read_lines(path: Path, what: str) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise JobError(f"{what} file {path} does not exist; give a text file with one entry per line")
    raw = path.read_bytes()
    if b"\0" in raw:
        raise JobError(f"{what} file {path} is binary (has NUL bytes); give a UTF-8 text file, one entry per line")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise JobError(f"{what} file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    lines = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) > MAX_PROMPT_CHARS:
            raise JobError(f"{what} file {path} line {n} has {len(line)} characters (> {MAX_PROMPT_CHARS}); "
                           f"split it or shorten it")
        lines.append(line)
    if not lines:
        raise JobError(f"{what} file {path} has no entries (only blank lines or # comments); write one per line")
    if len(lines) > MAX_PROMPTS:
        raise JobError(f"{what} file {path} has {len(lines)} entries (> {MAX_PROMPTS}); split the run")
    return lines


def load_prompts(prompts_file=None, categories_file=None, templates_file=None) -> list[str]:
    """Prompts from a file, or every category in every template (defaults when no file is given)."""
    if prompts_file is not None:
        if categories_file is not None or templates_file is not None:
            raise JobError("give either --prompts or --categories/--templates, not both")
        prompts = _read_lines(prompts_file, "prompts")
    else:
        cats = _read_lines(categories_file, "categories") if categories_file else list(DEFAULT_CATEGORIES)
        temps = _read_lines(templates_file, "templates") if templates_file else list(DEFAULT_TEMPLATES)
        for t in temps:
            if t.count("{category}") != 1 or re.search(r"\{(?!category\})", t):
                raise JobError(f"template {t!r} must contain {{category}} exactly once and no other {{...}}; "
                               f"e.g. '{{category}}, studio photo'")
        prompts = [t.replace("{category}", c) for c in cats for t in temps]
    seen, unique = set(), []
    for p in prompts:  # a repeated prompt would repeat its ids
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return unique


def slug(text: str, limit: int = 40) -> str:
    """File-name-safe lower-case words of `text` (a-z, 0-9, '-'), at most `limit` characters."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (s[:limit].rstrip("-") or "prompt")


def derive_seed(base_seed: int, prompt: str, index: int) -> int:
    digest = hashlib.sha256(f"{base_seed}\n{prompt}\n{index}".encode()).digest()
    return int.from_bytes(digest[:6], "big")  # < 2**48: fits every sampler's seed widget


def sample_id(prompt: str, seed: int) -> str:
    """Deterministic id: readable prompt words, the seed, and a hash of both (unique per prompt+seed)."""
    h = hashlib.sha256(f"{prompt}\n{seed}".encode()).hexdigest()[:10]
    return f"{slug(prompt, 32)}-{seed}-{h}"


def make_jobs(prompts: list[str], samples_per_prompt: int = 1, base_seed: int = 0,
              seeds: list[int] | None = None) -> list[Job]:
    """One job per (prompt, sample). `seeds` (explicit, the same for every prompt) overrides derivation."""
    if seeds is not None:
        if not seeds:
            raise JobError("--seeds is empty; give comma-separated whole numbers such as 1,2,3")
        if any(s < 0 or s >= 2 ** 63 for s in seeds):
            raise JobError(f"--seeds {seeds}: every seed must be in 0..2**63-1")
        per_prompt = list(seeds)
    else:
        if samples_per_prompt < 1:
            raise JobError(f"--samples-per-prompt {samples_per_prompt}: expected 1 or more")
        per_prompt = None
    jobs = []
    for p in prompts:
        n = len(per_prompt) if per_prompt is not None else samples_per_prompt
        for j in range(n):
            seed = per_prompt[j] if per_prompt is not None else derive_seed(base_seed, p, j)
            jobs.append(Job(sample_id(p, seed), p, seed, j))
    ids = [j.id for j in jobs]
    if len(set(ids)) != len(ids):
        raise JobError("two samples got the same id (a seed repeated in --seeds); give distinct seeds")
    return jobs
