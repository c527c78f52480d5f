"""NAMMs on the Hugging Face Hub: resolve ``ORG/NAME``, write a model card, upload.

A NAMM repo holds what :meth:`NAMM.save` writes (``namm.safetensors``,
``namm_config.json``) plus a ``README.md`` model card, the way mlx-community
shares models. Resolution goes through ``huggingface_hub.snapshot_download``,
so its cache (``HF_HOME``/``HF_HUB_CACHE``), offline mode (``HF_HUB_OFFLINE=1``)
and tokens apply unchanged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

from .namm import NAMM, NAMMFormatError

#: Files of a NAMM repo (``NAMM.save``'s two files and the card).
NAMM_FILES = ("namm.safetensors", "namm_config.json")
CARD_FILE = "README.md"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?")


class HubError(NAMMFormatError):
    """A NAMM could not be found, fetched or uploaded; the message is one line."""


def is_hub_id(ref: str | os.PathLike) -> bool:
    """``ORG/NAME`` (optionally ``@REVISION``) that is not an existing local path."""
    text = os.fspath(ref)
    return bool(_HUB_ID.fullmatch(text)) and not Path(text).expanduser().exists()


def resolve_namm(ref: str | os.PathLike) -> Path:
    """A local NAMM folder for ``ref``: the path itself, or the cached snapshot
    of the Hub repo ``ORG/NAME[@REVISION]`` (downloaded when not cached)."""
    if not is_hub_id(ref):
        return Path(ref).expanduser()
    repo_id, _, revision = os.fspath(ref).partition("@")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = snapshot_download(
            repo_id, revision=revision or None, allow_patterns=[*NAMM_FILES, CARD_FILE], library_name="namm-mlx"
        )
    except LocalEntryNotFoundError:
        raise HubError(
            f"no NAMM folder at {ref}, and the Hugging Face repo {repo_id} is not in the local cache "
            "(offline, or the Hub is unreachable); connect once to download it, or pass a NAMM folder"
        ) from None
    except RepositoryNotFoundError:
        raise HubError(f"no NAMM folder at {ref}, and no Hugging Face repo {repo_id} (or it is private: huggingface-cli login)") from None
    except RevisionNotFoundError:
        raise HubError(f"the Hugging Face repo {repo_id} has no revision {revision!r}") from None
    except HFValidationError as err:
        raise HubError(f"{ref} is neither a NAMM folder nor a valid Hugging Face repo id ({err})") from None
    except (OSError, ValueError) as err:  # network failures surface as OSError subclasses
        raise HubError(f"cannot download the NAMM {repo_id} from the Hugging Face Hub: {err}") from None
    folder = Path(folder)
    missing = [name for name in NAMM_FILES if not (folder / name).is_file()]
    if missing:
        raise HubError(f"the Hugging Face repo {repo_id} is not a NAMM: it has no {', '.join(missing)}")
    return folder


# --------------------------------------------------------------------------- model card


def evaluation_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The NAMM and full-cache rows of a ``namm eval`` ``results.json``."""
    return [row for row in results.get("overall", []) if row.get("policy") in ("namm", "full")]


def _provenance(namm_dir: Path) -> dict[str, str]:
    try:
        return dict(json.loads((namm_dir / "namm_config.json").read_text()).get("provenance") or {})
    except (OSError, ValueError):
        return {}


def card_text(
    namm_dir: str | os.PathLike,
    repo_id: str,
    base_model: str | None = None,
    results: Mapping[str, Any] | None = None,
) -> str:
    """The model card (YAML metadata + Markdown) for the NAMM in ``namm_dir``.

    base_model: the model it was evolved or distilled for (else the provenance's
    ``model``, if recorded); results: a ``namm eval`` results.json.
    """
    from huggingface_hub import ModelCardData

    folder = Path(namm_dir)
    namm = NAMM.load(folder)
    provenance = _provenance(folder)
    base_model = base_model or provenance.get("base_model") or provenance.get("model")
    source = provenance.get("source", "not recorded")
    data = ModelCardData(
        library_name="namm-mlx",
        license="apache-2.0",
        tags=["namm", "mlx", "mlx-lm", "kv-cache", "kv-cache-eviction"],
        base_model=base_model if base_model and _HUB_ID.fullmatch(base_model) else None,
    )
    made = {
        "namm evolve": "evolved with CMA-ES (`namm evolve`)",
        "namm distill": "distilled (`namm distill`)",
    }.get(source, f"made by {source}")
    for_model = f"`{base_model}`" if base_model else "not recorded (pass `--base-model` to `namm upload`)"
    details = ", ".join(f"{k} {v}" for k, v in provenance.items() if k in ("objective", "generation", "seed", "pop_size"))

    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A **Neural Attention Memory Model** (NAMM) for namm-mlx: a tiny "
        f"network ({namm.config.param_size:,} weights) that scores every token in an mlx-lm KV cache from the "
        "attention it receives and evicts the low scorers every "
        f"{namm.config.update_interval} tokens, per layer and KV head (Cetin et al., *An Evolved Universal "
        "Transformer Memory*, ICLR 2025). Memory stays bounded while the model reads long documents.",
        "",
        f"- Made for: {for_model}; it runs on any model family namm-mlx supports.",
        f"- How: {made}" + (f" ({details})." if details else "."),
        "",
        "## Evaluation",
        "",
    ]
    rows = evaluation_rows(results or {})
    if rows:
        command = (results or {}).get("config", {}).get("command")
        lines += [
            "| policy | score | kept fraction | peak memory (GB) | items |",
            "|---|---|---|---|---|",
            *(
                f"| {r['policy']} | {r['score']} | {r['kept_fraction']:.2f} | {r.get('peak_memory_gb', '-')} | {r.get('n', '-')} |"
                for r in rows
            ),
            "",
            f"Measured with `{command}`." if command else "Measured with `namm eval`.",
        ]
    else:
        lines.append("Not evaluated yet: `namm eval --out DIR`, then `namm upload ... --results DIR/results.json`.")
    lines += [
        "",
        "## Use it with mlx-lm",
        "",
        "```python",
        "import mlx_lm, namm_mlx",
        f'model, tokenizer = mlx_lm.load("{base_model or "mlx-community/Llama-3.2-3B-Instruct-4bit"}")',
        f'namm_mlx.attach(model, "{repo_id}")  # make_cache() now returns evicting caches',
        'prompt = tokenizer.apply_chat_template([{"role": "user", "content": open("doc.txt").read() + "\\n\\nSummarise it."}], add_generation_prompt=True)',
        "print(mlx_lm.generate(model, tokenizer, prompt, max_tokens=300, prefill_step_size=512))",
        "```",
        "",
        f"Or from the shell, with namm-mlx installed: `namm chat --doc report.pdf --namm {repo_id}`.",
        "",
    ]
    user_readme = folder / CARD_FILE
    if user_readme.is_file():
        notes = user_readme.read_text(encoding="utf-8", errors="replace").strip()
        lines += ["## Notes from the NAMM folder", "", re.sub(r"^#", "##", notes, flags=re.MULTILINE), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- upload


def stage_upload(
    namm_dir: str | os.PathLike,
    repo_id: str,
    out: str | os.PathLike,
    base_model: str | None = None,
    results_path: str | os.PathLike | None = None,
) -> Path:
    """Copy the NAMM's two files into ``out`` and write the card there as README.md.

    ``out`` must be new, empty, or an earlier stage (only the three files);
    anything else is refused so no user file is overwritten.
    """
    folder, stage = Path(namm_dir).expanduser(), Path(out).expanduser()
    if not _HUB_ID.fullmatch(repo_id) or "@" in repo_id:
        raise HubError(f"{repo_id!r} is not a Hugging Face repo id (expected ORG/NAME)")
    results = None
    if results_path is None and (folder / "results.json").is_file():
        results_path = folder / "results.json"
    if results_path is not None:
        try:
            results = json.loads(Path(results_path).read_text())
        except (OSError, ValueError) as err:
            raise HubError(f"cannot read the evaluation results {results_path}: {err}") from None
    text = card_text(folder, repo_id, base_model=base_model, results=results)  # validates the NAMM first
    if stage.exists():
        foreign = [p.name for p in stage.iterdir() if p.name not in (*NAMM_FILES, CARD_FILE)]
        if not stage.is_dir() or foreign:
            raise HubError(f"{stage} exists and holds other files ({', '.join(foreign[:3]) or 'not a folder'}); give a new --out folder")
    stage.mkdir(parents=True, exist_ok=True)
    for name in NAMM_FILES:
        shutil.copyfile(folder / name, stage / name)
    (stage / CARD_FILE).write_text(text, encoding="utf-8")
    return stage


def upload(stage: str | os.PathLike, repo_id: str, private: bool = False, message: str | None = None) -> str:
    """Create ``repo_id`` if needed and push the staged folder; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(stage),
            allow_patterns=[*NAMM_FILES, CARD_FILE],
            commit_message=message or "Upload NAMM with namm-mlx",
        )
    except Exception as err:  # HTTP, auth and network errors: one line for the user
        raise HubError(f"upload to {repo_id} failed: {type(err).__name__}: {' '.join(str(err).split())}") from None
    return str(getattr(info, "commit_url", info))
