"""The base of every typed schema a user writes into (recipe sections, plugin options).

Pydantic's lax mode turns `true` into 1 and `"0.5"` into 0.5 for a numeric field. For a recipe
that is a silent change of meaning: `data.augment.hflip: true` became a flip probability of 1.0,
so every training image was mirrored and no evaluation image was. So a number field takes
numbers only: a boolean or a text there is refused, naming the key and what to write instead.
One decision for every probability field: `true` is never read as a probability (no field of
this schema is a switch and a probability at once). Written here because pydantic's strict mode
would also refuse what YAML gives for tuples (lists) and for floats (ints).
"""

from __future__ import annotations

import typing
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError


def _accepts(annotation: Any) -> set[str]:
    """The kinds of scalar a field annotation takes: 'number', 'bool', 'str', 'other'."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return {"bool"}
    if annotation in (int, float):
        return {"number"}
    if annotation is str:
        return {"str"}
    if annotation is type(None):
        return set()
    if origin is Union or str(origin) == "types.UnionType":
        return set().union(*(_accepts(a) for a in typing.get_args(annotation)))
    if origin is Literal:
        values = typing.get_args(annotation)
        kinds = {"bool" if isinstance(v, bool) else "number" if isinstance(v, (int, float)) else "str"
                 for v in values}
        return kinds
    return {"other"}


def _element_annotation(annotation: Any) -> Any:
    """tuple[float, float] / list[float] -> float; else None."""
    origin = typing.get_origin(annotation)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        if args and all(a == args[0] for a in args):
            return args[0]
    if origin is Union:
        for arg in typing.get_args(annotation):
            element = _element_annotation(arg)
            if element is not None:
                return element
    return None


def _is_probability(field) -> bool:
    bounds = {type(m).__name__: getattr(m, type(m).__name__.lower(), None) for m in field.metadata}
    return bounds.get("Ge") == 0 and (bounds.get("Le") == 1 or bounds.get("Lt") == 1)


def _refusal(annotation: Any, value: Any, field) -> str | None:
    """Why `value` cannot stand for a number field, or None."""
    if isinstance(value, (list, tuple)):
        element = _element_annotation(annotation)
        if element is not None:
            return next(filter(None, (_refusal(element, v, field) for v in value)), None)
        return None
    kinds = _accepts(annotation)
    if "number" not in kinds or "other" in kinds:
        return None
    if isinstance(value, bool) and "bool" not in kinds:
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        default = field.get_default(call_default_factory=True)
        example = extra.get("example") or (f"e.g. {default}" if isinstance(default, (int, float))
                                           and not isinstance(default, bool) and default else "")
        if _is_probability(field):
            what = "a probability" if extra.get("example") else "a number between 0 and 1"
            return f"{what}, not a switch: write a number between 0 and 1 ({example or 'e.g. 0.5'})"
        return f"a number, not true/false: write the number{' (' + example + ')' if example else ''}"
    if isinstance(value, str) and "str" not in kinds:
        if _numeric(value):
            return f"a number, not text: write it without quotes, e.g. {value.strip()}"
        return "should be a number, not text"
    return None


def _numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


class StrictModel(BaseModel):
    """Unknown keys are errors, values are type-checked, a number field takes numbers only."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name)
        problem = _refusal(field.annotation, value, field) if field is not None else None
        if problem:
            raise PydanticCustomError("number_expected", problem)
        return value


def explain_validation(err: ValidationError, root: type[BaseModel], what: str) -> str:
    """pydantic's report as one paragraph naming each bad key and the fix: "{what} is invalid:
    unknown key 'data.batchsize'. Did you mean 'batch_size'? Valid keys here: ...; ..."."""
    from launcher.errors import did_you_mean, shorten

    problems = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        key = ".".join(loc)
        if e["type"] == "extra_forbidden":
            valid = valid_keys(root, loc[:-1])
            problems.append(
                f"unknown key '{key}'.{did_you_mean(loc[-1], valid)} Valid keys here: {', '.join(sorted(valid))}")
        elif e["type"] == "missing":
            problems.append(f"missing required key '{key}'")
        else:
            got, message = e.get("input"), e["msg"].removeprefix("Value error, ")
            if isinstance(got, dict) and e["type"] == "value_error":  # a section's own check names its keys
                problems.append(message)
            else:
                shown = "a mapping" if isinstance(got, dict) else shorten(repr(got), 80)
                problems.append(f"'{key}' = {shown}: {message}")
    return f"{what} is invalid: " + "; ".join(problems) + "."


def valid_keys(root: type[BaseModel], loc: list[str]) -> list[str]:
    """The keys of the section at `loc` (list positions skipped: rungs.0.name), [] for a free-form one."""
    model: Any = root
    for part in loc:
        if part.isdigit():
            continue
        model = _model_in(getattr(model.model_fields.get(part), "annotation", None))
        if model is None:
            return []
    return list(model.model_fields)


def _model_in(annotation: Any) -> Any:
    """The section class inside an annotation: Section, Optional[Section], list[Section]..."""
    stack = [annotation]
    while stack:
        current = stack.pop()
        if isinstance(current, type) and issubclass(current, BaseModel):
            return current
        stack += list(typing.get_args(current))
    return None
