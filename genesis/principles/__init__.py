"""The written principles (configs/principles.yaml) and the system prompt rendered from them."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from genesis.config import StrictModel, config_root, load_config


class Principle(StrictModel):
    name: str = Field(pattern=r"^[a-z0-9-]+$")
    description: str = Field(min_length=1)
    do: list[str] = Field(default_factory=list)
    dont: list[str] = Field(default_factory=list)


class Principles(StrictModel):
    name: str
    assistant_name: str = "Genesis"
    principles: list[Principle] = Field(min_length=1)

    def system_prompt(self, style: Literal["full", "brief"] = "full") -> str:
        """`full` states each principle with its description; `brief` names them in one sentence (for models
        whose context is too short to spend 150 tokens on the prompt, like the tiny CPU model)."""
        names = [p.name.replace("-", " ") for p in self.principles]
        if style == "brief":
            listed = ", ".join(names[:-1]) + (" and " if len(names) > 1 else "") + names[-1]
            return f"You are {self.assistant_name}. Be {listed}."
        lines = [f"You are {self.assistant_name}."]
        lines += [f"Be {name}: {p.description}" for name, p in zip(names, self.principles)]
        return "\n".join(lines)


def default_principles_path() -> Path:
    return config_root() / "principles.yaml"


def load_principles(path: str | Path | None = None) -> Principles:
    return load_config(Principles, path or default_principles_path())
