"""Command-line values of plain types converted without pydantic.

Typer converts every option value through a pydantic TypeAdapter, and importing pydantic for it
is about half of what `fairgpu submit` or `fairgpu queue` costs in CPU. Our commands take plain
types: str, int and float (with Typer's `min`/`max`), enums, and lists of those; for these the
conversion is a line of Python, with Typer's own messages. Any other type (paths, files) keeps
Typer's conversion.
"""
# Typer's parameter internals are private: the typer pin in pyproject.toml (>=0.29,<1) is what
# this module is written against, and tests/cli/test_startup.py and tests/cli/test_errors.py
# fail if a Typer release changes them.

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, get_args, get_origin

from typer import BadParameter
from typer._coercion import RuntimeParam, TypeDescriptor, build_runtime_param
from typer.core import _TyperParameter

if TYPE_CHECKING:
    from typer._click import Context

SCALARS = (str, int, float, bool)
TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
FALSE = frozenset({"0", "false", "f", "no", "n", "off"})


def _is_plain(annotation: Any) -> bool:
    return annotation in SCALARS or (isinstance(annotation, type) and issubclass(annotation, Enum))


@dataclass(frozen=True)
class PlainRuntimeParam(RuntimeParam):
    """Typer's runtime conversion contract for str, int, float, enums, and lists of them."""

    def _coerce_value(self, value: Any, param: Any, ctx: Context) -> Any:
        origin: Any = get_origin(self.annotation)
        if origin is list:
            item = get_args(self.annotation)[0]
            values = value if isinstance(value, list | tuple) else [value]
            return [self._one(item, v, param, ctx) for v in values]
        return self._one(self.annotation, value, param, ctx)

    def _one(self, annotation: Any, value: Any, param: Any, ctx: Context) -> Any:
        if annotation is bool:
            return self._bool(value, param, ctx)
        if isinstance(value, annotation) and not isinstance(value, bool):
            converted = value
        elif annotation is str:
            converted = str(value)
        elif annotation is int:
            try:
                converted = int(str(value).strip())
            except ValueError:
                raise BadParameter(
                    "Input should be a valid integer, unable to parse string as an integer",
                    ctx=ctx,
                    param=param,
                ) from None
        elif annotation is float:
            try:
                converted = float(str(value).strip())
            except ValueError:
                raise BadParameter(
                    "Input should be a valid number, unable to parse string as a number",
                    ctx=ctx,
                    param=param,
                ) from None
        else:
            return self._member(annotation, str(value), param, ctx)
        info = self.parameter_info
        if info.min is not None and converted < info.min:
            raise BadParameter(
                f"Input should be greater than or equal to {info.min}", ctx=ctx, param=param
            )
        if info.max is not None and converted > info.max:
            raise BadParameter(
                f"Input should be less than or equal to {info.max}", ctx=ctx, param=param
            )
        return converted

    def _bool(self, value: Any, param: Any, ctx: Context) -> bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in TRUE or text in FALSE:
            return text in TRUE
        raise BadParameter(
            "Input should be a valid boolean, unable to interpret input", ctx=ctx, param=param
        )

    def _member(self, enum: type[Enum], text: str, param: Any, ctx: Context) -> Enum:
        for member in enum:
            name = str(member.value)
            if name == text or (
                not self.parameter_info.case_sensitive and name.lower() == text.lower()
            ):
                return member
        choices = ", ".join(repr(str(m.value)) for m in enum)
        raise BadParameter(f"Value error, {text!r} is not one of {choices}.", ctx=ctx, param=param)


def plain_runtime_param(descriptor: TypeDescriptor) -> RuntimeParam:
    """The conversion of a parameter: ours for plain types, else Typer's."""
    annotation: Any = descriptor.annotation
    origin: Any = get_origin(annotation)
    items = get_args(annotation) if origin is list else (annotation,)
    simple = descriptor.file_annotation is None and not descriptor.is_path
    if simple and len(items) == 1 and _is_plain(items[0]):
        return PlainRuntimeParam(parameter_info=descriptor.parameter_info, annotation=annotation)
    return build_runtime_param(descriptor)


def install() -> None:
    """Make every Typer parameter, the root's and `--help` included, convert this way.

    Typer builds a parameter's conversion on first use in `_TyperParameter.get_runtime_param`;
    this replaces that one method (tests/cli/test_startup.py checks no pydantic is imported).
    """

    def get_runtime_param(self: _TyperParameter) -> RuntimeParam:
        if self._runtime_param is None:
            self._runtime_param = plain_runtime_param(self.type_descriptor)
        return self._runtime_param

    _TyperParameter.get_runtime_param = get_runtime_param  # type: ignore[method-assign]
