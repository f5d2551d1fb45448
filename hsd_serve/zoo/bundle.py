"""Bundle an aligned drafter (the output folder of ``hsd-serve align``) as a zoo model.

``python -m hsd_serve.zoo bundle --from DIR --name drafter_aligned`` copies the weights and the
tokenizer, keeps ``align.json`` (settings, data, held-out metrics before/after), measures the
aligned drafter against the drafter it started from on the zoo's validation text (nats/byte) and
in decode steps (interleaved), and writes the model card (``README.md``, ``zoo_card.json``).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import time
from pathlib import Path

from . import ALIGNED_NAMES, BUNDLED_DIR, BUNDLED_PREFIX, resolve_model_path
from .align import RECORD
from .corpus import Corpus
from .finalize import (KEEP_FILES, _context_ids, _load, decode_step_ms, fresh_copy,
                       val_loss_per_byte)
from .specs import SPECS


def _held_out(record: dict) -> str:
    rows = []
    before, after = record.get("heldout_before") or {}, record.get("heldout_after") or {}
    for key, what in (("soft_alpha", "Σ min(p, q') on the intersection (TLI's first-token "
                                     "acceptance, lower bound)"),
                      ("soft_kl", "KL(p̃ ‖ q')"), ("soft_tv", "total variation"),
                      ("greedy_agreement", "drafter argmax = target's greedy token"),
                      ("greedy_ce", "cross-entropy on the target's greedy text")):
        if key in before or key in after:
            rows.append(f"| `{key}` | {what} | {_num(before.get(key))} | {_num(after.get(key))} |")
    if not rows:
        return "(no held-out metrics in align.json)\n"
    return ("| metric | meaning | before | after |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")


def _num(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def _card(name: str, record: dict, info: dict) -> str:
    s, tr = record.get("settings", {}), record.get("training", {})
    cmd = "\n".join(info["commands"]) or "hsd-serve align ..."
    val, lat = info["val"], info["latency_ms"]
    return f"""---
license: {info['license']}
library_name: transformers
pipeline_tag: text-generation
---
# hsd_serve zoo: `{name}`

The drafter `{info['aligned_from']}` fine-tuned toward the bundled target by
`hsd-serve align` (docs/align.md) for **sampled** decoding: a soft-label loss between the target's
distribution and the drafter's on their shared vocabulary, at the temperatures below, plus
cross-entropy on the target's greedy text. Same architecture, tokenizer and size as
`{info['base_name']}`; only the weights differ. A test/benchmark fixture, not a useful code model.
Outputs do not depend on it (every method verifies against the target); speed does.

Use it for sampled traffic: `hsd-serve generate --drafter bundled:{name} --method tli
--temperature 1 ...`, `drafter: {{path: "bundled:{name}", head_ids: {s.get('drafter_head_ids', 0)}}}`
in a serve config. Benchmarks against `{info['base_name']}`: docs/align.md.

## How it was made

```
{cmd}
```

- data: the target's greedy continuation and one sampled continuation per temperature
  ({s.get('temperatures')}) of {s.get('prompts')} corpus prompts, {s.get('max_new_tokens')} new
  tokens each; the head pruned to {s.get('drafter_head_ids')} ids as served
- training: {tr.get('steps')} steps, {tr.get('epochs')} epochs, {tr.get('train_s')} s (every run of
  `--resume` together); the last run's loss `{s.get('loss')}`, greedy weight {s.get('ce_weight')}
- the full record (the last run's settings, data, training, held-out metrics): `align.json`

## Held-out metrics (align.json; continuations of prompts never trained on)

{_held_out(record)}
## Measured here

On the zoo's validation text ({val['val_sample_bytes']:,} bytes of held-out stdlib files):
**{val['val_nats_per_token']:.4f} nats/token, {val['val_nats_per_byte']:.4f} nats/byte**
(`{info['base_name']}`, the same text: {info['base_val']['val_nats_per_byte']:.4f} nats/byte).

| model (float32, 1 thread, 128-token context) | ms per step |
|---|---|
| `{name}` | {lat[name]:.2f} |
| `{info['base_name']}` (same run, interleaved) | {lat[info['base_name']]:.2f} |

{info['machine']}, {info['measured_at']}.
"""


def bundle_aligned(src: Path, name: str, *, base: str = "bundled:drafter",
                   out_root: Path = BUNDLED_DIR, threads: int = 1,
                   commands: tuple[str, ...] = ()) -> dict:
    """Copy ``src`` (an ``hsd-serve align`` output) to ``out_root/name`` with its card;
    ``commands``: the ``align`` commands that made it, for the card."""
    import torch

    if name not in ALIGNED_NAMES:
        raise ValueError(f"--name must be one of {ALIGNED_NAMES}, got {name!r}")
    src = Path(src)
    record_path = src / RECORD
    if not record_path.is_file() or not (src / "model.safetensors").is_file():
        raise FileNotFoundError(f"{src} is not an `hsd-serve align` output "
                                f"({RECORD} and model.safetensors needed)")
    record = json.loads(record_path.read_text())
    base_dir = Path(resolve_model_path(base))
    dst = Path(out_root) / name
    for what, path in (("--base", base_dir), ("--from", src)):
        if path.resolve() == dst.resolve():
            raise ValueError(f"{what} {path} is the folder the bundle replaces")
    base_name = base[len(BUNDLED_PREFIX):] if base.startswith(BUNDLED_PREFIX) else base_dir.name
    fresh_copy(src, dst, [f for f in KEEP_FILES if f != "LICENSE"])
    shutil.copyfile(record_path, dst / RECORD)
    license_text = (base_dir / "LICENSE").read_text() if (base_dir / "LICENSE").is_file() else ""
    (dst / "LICENSE").write_text(license_text + (
        f"\nThese weights are the weights of `{base}` fine-tuned by `hsd-serve align` on text the "
        "bundled target generated from CPython standard library prompts.\n"))

    torch.set_num_threads(threads)
    spec = SPECS["drafter"]
    docs = Corpus.build().val_text_sample()
    models = {name: _load(dst), base_name: _load(base_dir)}
    lat = decode_step_ms({k: m for k, (m, _) in models.items()},
                         {k: _context_ids(tok, spec, docs[0]) for k, (_, tok) in models.items()})
    base_card = (base_dir / "README.md").read_text() if (base_dir / "README.md").is_file() else ""
    licenses = re.findall(r"^license:\s*(\S+)", base_card, flags=re.M)
    info = {
        "base_name": base_name, "latency_ms": lat, "license": licenses[0] if licenses else "other",
        "val": val_loss_per_byte(*models[name], spec, docs),
        "base_val": val_loss_per_byte(*models[base_name], spec, docs),
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}, "
                   f"load avg {os.getloadavg()[0]:.1f}",
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "weights_bytes": (dst / "model.safetensors").stat().st_size,
        "aligned_from": base, "commands": list(commands),
    }
    (dst / "README.md").write_text(_card(name, record, info))
    (dst / "zoo_card.json").write_text(json.dumps(info, indent=1) + "\n")
    return info
