"""The family registry and the self-contained modeling files: what a family file declares, methods as operations
on layer kinds, no family named outside its file, and the bundler's rules."""

import ast

import pytest

from helpers import ROOT, make_linear_model, make_llama
from iclca_cli.bundle import standalone_source
from iclca_cli.errors import IclcaError
from iclca_cli.families import all_families, family_named
from iclca_cli.models.merged import modeling_file
from iclca_cli.methods import applicable, build
from iclca_cli.patch import check_method

PACKAGE = ROOT / "iclca_cli"


def names(family, config) -> list[str]:
    return [m.name for m in applicable(family, config)]


def test_methods_are_operations_on_layer_kinds():
    assert names(family_named("llama"), make_llama().config) == ["prefix", "compressed", "evict", "taylor", "lora"]
    assert names(family_named("iclca_linear"), make_linear_model().config) == ["exact", "lora"]  # weights: any family
    with pytest.raises(IclcaError, match="method 'exact' does not apply to 'llama' models"):
        check_method(make_llama(), build("exact"))


def test_a_layer_kind_iclca_cannot_patch_is_named_in_the_error():
    model = make_llama()
    model.config.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(IclcaError, match="layers of kinds chunked_attention, full_attention, which no method"):
        check_method(model, build("prefix"))


def test_a_trained_method_needs_an_exact_teacher():
    """lora acts on weights, so on a model of layer kinds iclca has no exact patch for (a conv layer in a Llama); its
    teacher must be the prompted model exactly, so converting there is refused, naming why."""
    from helpers import convert

    model = make_llama()
    model.config.layer_types = ["full_attention", "conv"]
    with pytest.raises(IclcaError, match="no exact patch .* to train toward"):
        convert(model, [5, 6, 7, 8], "lora", steps=1)


def test_no_family_is_named_outside_its_file():
    """Per-family behaviour lives in iclca_cli/families/<family>.py: no other module holds a family's model type as
    a string (the iclca_linear model's own modeling file declares its model_type, as every modeling file does)."""
    names = set(all_families())
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "families" or path.name == "modeling_iclca_linear.py":
            continue
        literals = {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)}
        assert not literals & names, f"{path.relative_to(ROOT)} names {literals & names}"


@pytest.mark.parametrize("name", sorted(all_families()))
def test_every_modeling_file_stands_alone(name):
    """It compiles, defines the classes its auto_map names, and imports nothing of iclca."""
    filename, source, auto_map = modeling_file(family_named(name))
    tree = ast.parse(source)
    defined = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {ref.split(".")[1] for ref in auto_map.values()} <= defined
    assert {ref.split(".")[0] for ref in auto_map.values()} == {filename.removesuffix(".py")}
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m.split(".")[0] for m in imported if m} <= {"__future__", "functools", "sys", "torch", "transformers",
                                                        "huggingface_hub"}
    assert all(n.level == 0 for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))


def test_the_bundler_refuses_what_it_cannot_inline(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("from .b import f\n\n\ndef g():\n    return f()\n")
    (pkg / "b.py").write_text("def f():\n    return 1\n\n\ndef g():\n    return 2\n")
    with pytest.raises(ValueError, match="'g' is defined in both"):
        standalone_source([pkg / "a.py"], "t")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n    return g\n")
    with pytest.raises(ValueError, match="relative import inside a function"):
        standalone_source([pkg / "a.py"], "t")
    (pkg / "b.py").write_text("import math\n\n\ndef f():\n    return math.pi\n")
    namespace = {}
    exec(standalone_source([pkg / "a.py"], "t"), namespace)  # noqa: S102  (our own generated test source)
    assert namespace["g"]() == pytest.approx(3.14159, abs=1e-5)


def test_the_family_tables_are_the_registries():
    import subprocess
    import sys

    def printed(*args):
        return subprocess.run([sys.executable, "scripts/families.py", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()

    assert printed() in (ROOT / "docs/families.md").read_text()
    assert printed("--methods") in (ROOT / "README.md").read_text()


def test_the_readme_reads_in_five_minutes_and_its_links_exist():
    import re

    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"


def test_no_method_is_named_outside_its_file():
    """What a method does lives in iclca_cli/methods/: no other module of the package holds a method's name as a
    string (so none compares one)."""
    from iclca_cli.methods import all_methods

    names = set(all_methods())
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "methods":
            continue
        literals = {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)}
        assert not literals & names, f"{path.relative_to(ROOT)} names {literals & names}"


def test_the_architecture_pages_example_method_is_one_file(tmp_path, monkeypatch):
    """docs/architecture.md's `stride` method, dropped as one file on the registry's path: it is listed, applies to
    softmax decoders, round-trips through a patch file, at a stride of 1 equals the prefix patch, and the command
    line takes it with its flag."""
    import re
    import subprocess
    import sys

    import iclca_cli.methods as methods
    from helpers import convert, logits, random_ids
    from iclca_cli.fingerprint import model_fingerprint
    from iclca_cli.patch import check_patch_fits, load_patch, save_patch

    page = (ROOT / "docs/architecture.md").read_text()
    source = next(b for b in re.findall(r"```python\n(.*?)```", page, re.S) if "class Stride(Method)" in b)
    (tmp_path / "stride.py").write_text(source)
    monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(tmp_path)])
    methods.all_methods.cache_clear()
    try:
        model = make_llama()
        assert "stride" in names(family_named("llama"), model.config)
        prompt, query = random_ids(21, 97, 1), random_ids(5, 97, 2)
        every, patch = convert(model, prompt, "stride", k=1)
        prefix, _ = convert(model, prompt, "prefix")
        assert (logits(every, query) - logits(prefix, query)).abs().max() <= 1e-12
        _, patch = convert(model, prompt, "stride", k=4)
        save_patch(patch, tmp_path / "s.st")
        loaded = load_patch(tmp_path / "s.st")
        assert loaded.method == methods.build("stride", k=4) and loaded.metadata()["iclca.stride"] == "4"
        check_patch_fits(loaded, model, model_fingerprint(model))
        # the command line, in a fresh process that finds the file: --method stride and its --stride flag exist
        code = (f"import iclca_cli.methods as m; m.__path__.append({str(tmp_path)!r}); "
                "from typer.testing import CliRunner; from iclca_cli.cli import app; "
                f"r = CliRunner().invoke(app, ['convert', {str(ROOT / 'configs/examples/recall-prompt.txt')!r}, "
                f"'-m', 'demo-gpt2', '-o', {str(tmp_path / 'cli.st')!r}, '--method', 'stride', '--stride', '3']); "
                "print(r.exit_code, r.stderr)")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
        assert proc.stdout.startswith("0 "), proc.stdout + proc.stderr
        assert load_patch(tmp_path / "cli.st").metadata()["iclca.stride"] == "3"
    finally:
        sys.modules.pop("iclca_cli.methods.stride", None)
        methods.all_methods.cache_clear()


def test_method_specs_name_every_parameter():
    """The compact names scripts and tables use (methods.from_spec): budget as R or P/N, the rest in order or by name."""
    from iclca_cli.methods import from_spec

    assert from_spec("taylor1", 30) == build("taylor", order=1)
    assert from_spec("evict-P/3", 30) == build("evict", budget=10)
    assert from_spec("compressed-P/4:own:kmeans:uniform", 100) == build("compressed", budget=25, queries="own",
                                                                           keys="kmeans", split="uniform")
    assert from_spec("compressed-8:refine=True:lr=0.05", 40) == build("compressed", budget=8, refine=True, lr=0.05)
    assert from_spec("compressed-P/40", 30).budget == 2  # at least 2
    for bad, message in (("compressed-8:depth=3", "no parameter 'depth'"), ("compressed-8:refine=yes", "not a bool"),
                         ("Compressed", "cannot read"), ("wavelet", "unknown method")):
        with pytest.raises(IclcaError, match=message):
            from_spec(bad, 30)
