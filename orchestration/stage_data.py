"""Every stage's data, as canonical JSONL files under `<run>/data/`.

`materialise(cfg)` runs once on the driver, before any worker starts:
- `data.source: synthetic`: the suite's records for each split (deterministic
  in the seed), plus, for held-out comparisons, the same responses ranked by
  the noiseless gold labeler (`comparisons_<split>_gold.jsonl`);
- `data.source: files`: the configured files, split 80/10/10 by a stable hash
  of each prompt (or text), so validation never sees a training prompt;
- `data.source: public`: the public sets under `data.public_root`, through their
  adapters (`rlhf.data.public`), split the same way.
Workers then `load` records through `rlhf.data.load_records`, dropping prompts
longer than `model.max_prompt_tokens` tokens of the stage's tokenizer (the
paper filters prompts over 1k tokens) and logging how many.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

from rlhf.config import Config
from rlhf.data import Comparison, Record, load_records, load_records_with_stats, write_jsonl
from rlhf.data.public import FILES as PUBLIC_FILES, public_records
from rlhf.synthetic import SyntheticSuite, noiseless_ranks, parse_prompt
from rlhf.synthetic.tasks import SPLITS, split_of

logger = logging.getLogger(__name__)

# our file stem -> (record kind for the loaders, config field of data.source=files)
KINDS = {"demonstrations": ("demonstrations", "demonstrations"),
         "comparisons": ("comparisons", "comparisons"),
         "prompts": ("prompts", "prompts"),
         "pretrain": ("text", "pretrain_text")}
MANIFEST = "manifest.json"


def data_dir(cfg: Config) -> Path:
    return cfg.output_dir / "data"


def data_file(cfg: Config, name: str, split: str, gold: bool = False) -> Path:
    return data_dir(cfg) / f"{name}_{split}{'_gold' if gold else ''}.jsonl"


def synthetic_suite(cfg: Config) -> SyntheticSuite:
    syn = cfg.data.synthetic
    return SyntheticSuite(syn.seed, syn.labeler_agreement, syn.demo_noise, syn.families)


def synthetic_records(cfg: Config) -> dict[str, list[Record]]:
    """File name (without .jsonl) -> records, for the synthetic suite."""
    syn, suite = cfg.data.synthetic, synthetic_suite(cfg)
    train = {"demonstrations": syn.num_demonstrations, "comparisons": syn.num_comparisons,
             "prompts": syn.num_prompts, "pretrain": syn.num_pretrain_docs}
    held_out = {"demonstrations": syn.num_eval_prompts, "prompts": syn.num_eval_prompts,
                "comparisons": syn.num_eval_comparisons or syn.num_eval_prompts,
                "pretrain": cfg.eval.num_pretrain_docs}
    out: dict[str, list[Record]] = {}
    for split in SPLITS:
        n = train if split == "train" else held_out
        out[f"demonstrations_{split}"] = suite.demonstrations(split, n["demonstrations"])
        out[f"comparisons_{split}"] = suite.comparisons(split, n["comparisons"], syn.k_min, syn.k_max,
                                                        run_on_prob=syn.run_on_prob if split == "train" else 0.0)
        out[f"prompts_{split}"] = suite.prompt_records(split, n["prompts"])
        out[f"pretrain_{split}"] = suite.pretraining_text(split, n["pretrain"])
        if split != "train":
            out[f"comparisons_{split}_gold"] = gold_rankings(out[f"comparisons_{split}"])
    return out


def gold_rankings(comparisons: list[Comparison]) -> list[Comparison]:
    """The same responses ranked by the noiseless gold labeler (all-tied prompts left out)."""
    out = []
    for c in comparisons:
        ranks = noiseless_ranks(parse_prompt(c.prompt), c.responses)
        if len(set(ranks)) > 1:
            out.append(Comparison(prompt=c.prompt, responses=c.responses, ranks=ranks))
    return out


def split_by_hash(records: list[Record]) -> dict[str, list[Record]]:
    """80/10/10 train/valid/test by a stable hash of each record's prompt (or text)."""
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for r in records:
        out[split_of(getattr(r, "prompt", None) or r.text)].append(r)
    return out


def file_records(cfg: Config) -> dict[str, list[Record]]:
    return _split_all({name: load_records(getattr(cfg.data, field), kind, columns=cfg.data.columns.get(field))
                       for name, (kind, field) in KINDS.items()})


def public_split_records(cfg: Config) -> dict[str, list[Record]]:
    return _split_all(public_records(cfg.data.public_root))


def _split_all(by_name: dict[str, list[Record]]) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {}
    for name, records in by_name.items():
        for split, recs in split_by_hash(records).items():
            out[f"{name}_{split}"] = recs
    return out


def _manifest(cfg: Config) -> dict:
    """What the data files were made from; a change means they are made again."""
    if cfg.data.source == "synthetic":
        return {"source": "synthetic", "synthetic": cfg.data.synthetic.model_dump(),
                "eval_pretrain_docs": cfg.eval.num_pretrain_docs}
    if cfg.data.source == "public":
        files = {name: str(Path(cfg.data.public_root) / rel) for name, rel in PUBLIC_FILES.items()}
    else:
        files = {field: getattr(cfg.data, field) for _, field in KINDS.values()}
    return {"source": cfg.data.source, "files": files, "columns": cfg.data.columns,
            "mtimes": {f: Path(p).stat().st_mtime for f, p in files.items() if Path(p).exists()}}


def materialise(cfg: Config) -> Path:
    """Write the run's data files unless the same data is already there; returns the folder."""
    folder = data_dir(cfg)
    manifest = _manifest(cfg)
    if (folder / MANIFEST).exists() and json.loads((folder / MANIFEST).read_text()) == manifest:
        return folder
    records = {"synthetic": synthetic_records, "files": file_records,
               "public": public_split_records}[cfg.data.source](cfg)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    for stem, recs in records.items():
        n = write_jsonl(recs, folder / f"{stem}.jsonl")
        logger.info("data: %s: %d records", stem, n)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: marks the set complete
    return folder


def prompt_too_long(tokenizer, max_tokens: int) -> Callable[[str], bool]:
    return lambda prompt: len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) > max_tokens


def load(cfg: Config, name: str, split: str, tokenizer=None, gold: bool = False,
         limit: int | None = None) -> list[Record]:
    """Records of one materialised file; with a tokenizer, over-long prompts are dropped and counted."""
    path = data_file(cfg, name, split, gold)
    if not path.exists() and gold:
        return []  # only the synthetic task has a gold labeler
    kind = KINDS[name][0]
    too_long = None if tokenizer is None or kind == "text" else prompt_too_long(
        tokenizer, cfg.model.max_prompt_tokens)
    result = load_records_with_stats(path, kind, limit=limit, too_long=too_long,
                                     cache_dir=str(data_dir(cfg) / ".cache"))
    if result.n_filtered:
        logger.warning("%s: dropped %d of %d records with prompts over %d tokens", path.name,
                       result.n_filtered, result.n_rows, cfg.model.max_prompt_tokens)
    return result.records
