"""The zoo's registry: one card per entry, `LM/LAYER/FAMILY`, shipped with the package (`rsae/zoo/cards/`).

A card (`<name>.json`) says what the entry is and where its weights live:

- `name`, `status`: `published` (weights exist, every file's sha256 recorded: on the Hub at `hub.revision`,
  and for entries that ship with the source tree a copy under `shipped/`) or `recipe` (no weights anywhere yet;
  `rsae zoo build` makes them);
- `lm`: the language model (`name`, `revision`, `hook_name`, `processing`);
- `teacher`: where the teacher comes from (`source`: `recipe`, `zoo:NAME`, `hf:...` or `saelens:...`), its
  `format`, `license` and provenance;
- `recipe`: how the entry is built: the `rsae` command and its arguments (the stages are the quickstart's
  configs in `configs/`);
- `hub`: `repo_id`, `path_in_repo`, `revision`, and `files` (name -> sha256);
- `evaluation`: the side-by-side table (teacher, rsae-init, rsae, control: MSE, explained variance, L0, alive,
  CE degradation, loss recovered) and the data it was measured on.

A card that claims weights holds their hashes (`validate`); no card claims weights that do not exist.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

Status = Literal["published", "recipe"]
STATUSES: tuple[str, ...] = ("published", "recipe")
CARD_SUFFIX = ".json"


class ZooError(ValueError):
    """A zoo request that cannot be served; the message names the entry, the file or the server, and the fix."""


@dataclass
class Card:
    name: str
    """`LM/LAYER/FAMILY`, e.g. `smollm2-135m/L15/topk`."""
    status: Status
    """`published` (weights exist, hashes below) or `recipe` (build it with `rsae zoo build NAME`)."""
    lm: dict[str, Any]
    """`name` (what `rsae` loads: a built-in name, a Hub name), `revision`, `hook_name`, `processing`."""
    teacher: dict[str, Any]
    """`source` (`recipe`, `zoo:NAME`, `hf:...`, `saelens:...`), `format`, `license`, `description`."""
    recipe: dict[str, Any]
    """`command`: the `rsae` subcommand (`quickstart` or `upgrade`), `args`: its arguments, and `dtype`: the storage
    dtype of the entry's weights (default float32)."""
    hub: dict[str, Any] = field(default_factory=dict)
    """`repo_id`, `path_in_repo`, `revision`, `files` (name -> sha256)."""
    evaluation: dict[str, Any] = field(default_factory=dict)
    """`table` ({run: {metric: value}}) and `data` (what it was measured on)."""
    shipped: str | None = None
    """Folder (relative to the cards) of a copy of the weights that ships with the source tree, or None."""
    notes: str = ""
    """Anything a user should know (licence conditions, caveats)."""

    @property
    def family(self) -> str:
        return self.name.rsplit("/", 1)[-1]

    def build_command(self) -> str:
        return f"rsae zoo build {self.name}"

    def validate(self) -> None:
        """ZooError unless the card is well formed and a published card records every file's hash."""
        if self.name.count("/") != 2:
            raise ZooError(f"zoo card {self.name!r}: a name is LM/LAYER/FAMILY")
        if self.status not in STATUSES:
            raise ZooError(f"zoo card {self.name}: status {self.status!r} is not one of {STATUSES}")
        if self.status == "published":
            files = self.hub.get("files") or {}
            missing = [key for key in ("repo_id", "path_in_repo", "revision") if not self.hub.get(key)]
            if missing or not {"cfg.json", "weights.safetensors"} <= set(files):
                lacking = ", ".join(missing) or "the sha256 of cfg.json and weights.safetensors"
                raise ZooError(f"zoo card {self.name}: published without {lacking}; a card that claims weights "
                               "holds their hashes")
        elif self.hub.get("files") or self.shipped:
            raise ZooError(f"zoo card {self.name}: a recipe card claims weights (hub.files / shipped)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cards_root() -> Path:
    return Path(str(resources.files("rsae.zoo") / "cards"))


def card_path(name: str) -> Path:
    return cards_root() / f"{name}{CARD_SUFFIX}"


SHIPPED_DIR = "shipped"
"""Folder (under the cards) of the weights that ship with the package: entry folders, not cards."""


def names() -> list[str]:
    root = cards_root()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob(f"*{CARD_SUFFIX}")
                  if p.relative_to(root).parts[0] != SHIPPED_DIR)


def read_card(path: Path) -> Card:
    try:
        card = Card(**json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError) as err:
        raise ZooError(f"zoo card {path} is not a valid card ({err}); reinstall rsae") from err
    card.validate()
    return card


def card(name: str) -> Card:
    """The card of `name`; ZooError with the closest names for an unknown one."""
    path = card_path(name)
    if not path.is_file():
        close = difflib.get_close_matches(name, names(), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ZooError(f"no zoo entry {name!r}{hint} (`rsae zoo list` shows them all)")
    return read_card(path)


def write_card(entry: Card, root: Path | None = None) -> Path:
    """Write a card (validated) as sorted, indented JSON; atomically."""
    from rsae._io import write_bytes_atomic

    entry.validate()
    path = (root or cards_root()) / f"{entry.name}{CARD_SUFFIX}"
    write_bytes_atomic(path, (json.dumps(entry.to_dict(), indent=1) + "\n").encode())
    return path
