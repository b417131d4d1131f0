"""Every config field is read by the code it configures.

A field nobody reads is a setting that silently does nothing. The scan walks the
schema of rlhf/config.py (every section, recursively) and looks for a read of each
field in the package sources (rlhf/, actors/, orchestration/) outside rlhf/config.py
and orchestration/plan.py (a value `--dry-run` only prints is not consumed).

A read is an attribute access `<x>.field` or `getattr(<x>, "field")` where `<x>` is
bound to that field's section in the same file: the section's own name (`cfg.ppo.lr`,
`self.ppo.lr`), a name assigned from it (`p = cfg.ppo`, `cfg, pc = ctx.cfg, ctx.cfg.pretrain`,
`getattr(cfg, "rm")`), a name annotated with the section's class (`cfg: OptimizerConfig`)
or built from it (`ServeConfig.model_validate(...)`). Field names alone would not do:
`.name`, `.seed` or `.device` are read all over the code from Paths and tensors.
Fields read inside a `Config` property count when that property is read
(`cfg.ptx_block_tokens` reads `ppo.ptx_seq_len`).
The scan errs towards "read" where a section shares its name with a common
variable (`self.model.dtype` of a torch model looks like `cfg.model.dtype`), and
towards "unread" for dynamic access it cannot follow.

Reads the scan cannot see go in ALLOWED, each with the file that consumes the field,
a pattern that must still be in that file, and why.
"""
from __future__ import annotations

import ast
import inspect
import re

import pytest
from pydantic import BaseModel, Field

from rlhf.config import REPO_ROOT, Config, RMConfig

PACKAGES = ("rlhf", "actors", "orchestration")
NOT_CONSUMERS = {"rlhf/config.py", "orchestration/plan.py"}

# field -> (file that consumes it, regex that must match in that file, why the scan misses it)
ALLOWED: dict[str, tuple[str, str, str]] = {
    "data.demonstrations": ("orchestration/stage_data.py", r'"demonstrations"',
                            "read by name, getattr(cfg.data, field) over the KINDS table"),
    "data.comparisons": ("orchestration/stage_data.py", r'"comparisons"',
                         "read by name, getattr(cfg.data, field) over the KINDS table"),
    "data.pretrain_text": ("orchestration/stage_data.py", r'"pretrain_text"',
                           "read by name, getattr(cfg.data, field) over the KINDS table"),
    "ppo_init_sft.select_by_rm": ("orchestration/stages/sft.py", r"\.select_by_rm\b",
                                  "getattr(cfg, section).select_by_rm, the section passed by "
                                  "orchestration/pipeline.py"),
}


def leaf_fields(model: type[BaseModel], path: tuple[str, ...] = ()):
    """(section path, section class, field name) for every user field, sub-sections walked into."""
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from leaf_fields(ann, path + (name,))
        elif not info.exclude:  # Config.source: where the config came from, not a setting
            yield path, model.__name__, name


def _key(node: ast.AST) -> str | None:
    """The last name of `a.b.c` (or a bare name): what a section or an alias is called."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _getattr_constant(node: ast.AST) -> tuple[ast.AST, str] | None:
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
            and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)):
        return node.args[0], node.args[1].value
    return None


class Module:
    """What one source file reads and binds, walked once: `reads` holds (holder, attribute)."""

    def __init__(self, text: str):
        self.reads: set[tuple[str | None, str]] = set()
        self.bound: list[tuple[str, ast.AST]] = []  # (name, the value assigned to it)
        self.annotated: list[tuple[str, str]] = []  # (name, its annotation as text)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                self.reads.add((_key(node.value), node.attr))
            got = _getattr_constant(node)
            if got:
                self.reads.add((_key(got[0]), got[1]))
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    pairs = (zip(target.elts, node.value.elts)
                             if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple)
                             else [(target, node.value)])
                    self.bound += [(_key(t), v) for t, v in pairs if _key(t)]
            elif isinstance(node, ast.AnnAssign) and _key(node.target):
                self.annotated.append((_key(node.target), ast.unparse(node.annotation)))
                if node.value is not None:
                    self.bound.append((_key(node.target), node.value))
            elif isinstance(node, ast.arg) and node.annotation is not None:
                self.annotated.append((node.arg, ast.unparse(node.annotation)))

    def holders(self, section: str, cls: str) -> set[str]:
        """Names that hold `section` (of class `cls`) somewhere in this module."""
        def holds_section(value: ast.AST) -> bool:
            if isinstance(value, ast.Attribute) and value.attr == section:
                return True
            got = _getattr_constant(value)
            if got and got[1] == section:
                return True
            # ServeConfig(...) / ServeConfig.model_validate(...)
            return isinstance(value, ast.Call) and (_key(value.func) == cls or (
                isinstance(value.func, ast.Attribute) and _key(value.func.value) == cls))

        return ({section} | {name for name, value in self.bound if holds_section(value)}
                | {name for name, ann in self.annotated if re.search(rf"\b{cls}\b", ann)})

    def reads_field(self, section: str, cls: str, field: str) -> bool:
        fields_read_from = {holder for holder, attr in self.reads if attr == field}
        return bool(fields_read_from) and bool(fields_read_from & self.holders(section, cls))


def _property_reads() -> dict[str, set[str]]:
    """Config property -> the dotted fields its body reads (`self.ppo.ptx_seq_len`)."""
    out = {}
    for name, member in inspect.getmembers(Config, lambda m: isinstance(m, property)):
        body = inspect.getsource(member.fget)
        out[name] = set(re.findall(r"\bself\.(\w+(?:\.\w+)+)", body))
    return out


def unread_fields(schema: type[BaseModel], sources: dict[str, str]) -> list[str]:
    modules = [Module(text) for text in sources.values()]
    via_property = {f for prop, fields in _property_reads().items()
                    if any(re.search(rf"\.{prop}\b", text) for text in sources.values()) for f in fields}
    return [".".join(path + (field,)) for path, cls, field in leaf_fields(schema)
            if ".".join(path + (field,)) not in via_property
            and not any(m.reads_field(path[-1], cls, field) for m in modules)]


def package_sources() -> dict[str, str]:
    return {str(p.relative_to(REPO_ROOT)): p.read_text()
            for pkg in PACKAGES for p in sorted((REPO_ROOT / pkg).rglob("*.py"))
            if str(p.relative_to(REPO_ROOT)) not in NOT_CONSUMERS}


def test_every_config_field_is_read_outside_the_schema():
    unread = [f for f in unread_fields(Config, package_sources()) if f not in ALLOWED]
    assert not unread, (f"config fields no code reads (wire each to what it says, remove it, "
                        f"or add it to ALLOWED with its consumer): {unread}")


@pytest.mark.parametrize("field", sorted(ALLOWED))
def test_each_allowed_field_exists_and_its_consumer_still_reads_it(field):
    every = {".".join(p + (n,)) for p, _, n in leaf_fields(Config)}
    assert field in every, f"ALLOWED names {field}, which is not in the schema"
    file, pattern, why = ALLOWED[field]
    assert re.search(pattern, (REPO_ROOT / file).read_text()), \
        f"{field}: ALLOWED says {file} consumes it ({why}), but {pattern!r} is no longer there"


class _RMWithDummy(RMConfig):
    nobody_reads_this: int = 0


class _ConfigWithDummy(Config):
    rm: _RMWithDummy = Field(default_factory=_RMWithDummy)


def test_the_scan_catches_a_field_nobody_reads():
    sources = package_sources()
    assert set(unread_fields(_ConfigWithDummy, sources)) - set(unread_fields(Config, sources)) \
        == {"rm.nobody_reads_this"}


def test_a_field_name_read_from_another_object_is_not_a_read():
    # `.name` of a Path is not a read of a config field called `name`, nor `.lr` of another section.
    m = Module("def f(cfg, p):\n    x = cfg.sft\n    return p.name, cfg.ppo.lr, x.epochs\n")
    assert not m.reads_field("run", "RunConfig", "name")
    assert m.reads_field("ppo", "PPOConfig", "lr")
    assert not m.reads_field("rm", "RMConfig", "lr")
    assert m.reads_field("sft", "SFTConfig", "epochs")
    assert not m.reads_field("rm", "RMConfig", "epochs")


def test_reads_through_aliases_annotations_and_properties_are_seen():
    src = ("from rlhf.config import OptimizerConfig, ServeConfig\n"
           "def f(ctx, o: OptimizerConfig, raw):\n"
           "    cfg, pc = ctx.cfg, ctx.cfg.pretrain\n"
           "    s = ServeConfig.model_validate(raw)\n"
           "    return pc.seq_len, o.eps, s.max_body_bytes, getattr(cfg.rm, 'normalize'), cfg.ptx_block_tokens\n")
    unread = set(unread_fields(Config, {"m.py": src}))
    assert not unread & {"pretrain.seq_len", "optimizer.eps", "serve.max_body_bytes", "rm.normalize",
                         "ppo.ptx_seq_len"}
    assert {"pretrain.steps", "serve.port", "ppo.kl_coef"} <= unread
