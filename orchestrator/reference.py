"""The config reference, docs/reference/config.md, generated from the pydantic models of the experiment config.

`python -m orchestrator.reference` prints it and `make docs` writes it; tests/test_reference.py fails when the committed
page differs from what the code generates. Each section of `ExperimentConfig` is one table of `section.key`
rows: the type with its bounds, the default, and the field's `description`.
"""

from __future__ import annotations

import inspect
import json
import sys
import types
import typing

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from orchestrator.config import ExperimentConfig

PAGE = "config.md"
BOUNDS = ((Ge, "ge", "≥"), (Gt, "gt", ">"), (Le, "le", "≤"), (Lt, "lt", "<"))
HEADER = """# Config reference

Generated from `orchestrator/config.py` by `make docs`: do not edit by hand. Every key of an experiment
config, per section, with its type, default and meaning. A config names only the keys it changes; an
unknown key is an error naming it. Override any key on the command line with `--set section.key=value`.
A config may start with `extends: <file>` (relative to it): that file's keys are merged under its own, as
configs/demo.yaml and configs/full.yaml extend configs/recipe.yaml.
How to use them: [training](../training.md), [evaluation](../evaluation.md), [serving](../serving.md).
"""


def _value(value: object) -> str:
    """A default as YAML would write it."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _model_in(annotation: object) -> type[BaseModel] | None:
    """The section model an annotation holds (`X` or `X | None`), if any."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if len(args) == 1 and inspect.isclass(args[0]) and issubclass(args[0], BaseModel):
        return args[0]
    return None


def type_name(annotation: object) -> str:
    """A readable name for a field's type: `int`, `"input" | "deep"`, `list[str] | null`, ..."""
    if annotation is type(None):
        return "null"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin is typing.Annotated:
        bounds = _bounds(args[1:])
        return type_name(args[0]) + (f" ({', '.join(bounds)})" if bounds else "")
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(metadata: typing.Iterable[object]) -> list[str]:
    out = []
    for item in metadata:
        for kind, attr, sign in BOUNDS:
            if isinstance(item, kind):
                out.append(f"{sign} {getattr(item, attr)}")
        if isinstance(item, MinLen):
            out.append(f"length ≥ {item.min_length}")
        if isinstance(item, MaxLen):
            out.append(f"length ≤ {item.max_length}")
        if isinstance(item, FieldInfo):
            out += _bounds(item.metadata)
    return out


def _row(key: str, field: FieldInfo) -> str:
    bounds = _bounds(field.metadata)
    kind = type_name(field.annotation) + (f" ({', '.join(bounds)})" if bounds else "")
    section = _model_in(field.annotation)
    if section is not None:  # its keys have a table of their own
        kind = "section | null" if field.default is None else "section"
        default = "required" if field.is_required() else "`null`" if field.default is None else "below"
    elif field.is_required():
        default = "required"
    elif field.default_factory is not None:
        default = _value(field.default_factory())
    elif field.default is PydanticUndefined:
        default = ""
    else:
        default = _value(field.default)
    # A section without a description of its own is described by its model's first line.
    about = (
        field.description or (inspect.getdoc(section) or "").split("\n\n")[0]
        if section
        else field.description
    )
    cells = [f"`{key}`", kind, default, (about or "").replace("\n", " ")]
    return "| " + " | ".join(c.replace("|", "\\|") if i else c for i, c in enumerate(cells)) + " |"


def sections(model: type[BaseModel], prefix: str) -> list[tuple[str, type[BaseModel]]]:
    """Every section under `model`, depth first: (its dotted name, its model)."""
    found = []
    for name, field in model.model_fields.items():
        sub = _model_in(field.annotation)
        origin = typing.get_origin(field.annotation)
        if sub is None and origin is dict:
            sub = _model_in(typing.get_args(field.annotation)[1])
            name = f"{name}.<key>" if sub else name
        if sub is not None:
            dotted = f"{prefix}{name}"
            found += [(dotted, sub), *sections(sub, dotted + ".")]
    return found


def config_page() -> str:
    """The config reference as Markdown."""
    lines = [HEADER]
    for name, model in [("", ExperimentConfig), *sections(ExperimentConfig, "")]:
        prefix = f"{name}." if name else ""
        doc = inspect.cleandoc(model.__doc__) if model.__doc__ and model is not ExperimentConfig else ""
        lines += [f"## `{name}`" if name else "## Top level", ""]
        lines += [doc.replace("\n", " "), ""] if doc else []
        lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        lines += [_row(prefix + key, field) for key, field in model.model_fields.items()]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":  # `make docs` writes it to docs/reference/<PAGE>
    sys.stdout.buffer.write(config_page().encode("utf-8"))
