"""Documentation that runs: every code block of README.md and docs/**/*.md is executed or checked, and the
documentation site builds without a warning.

* ```python blocks: the blocks of one file run in order, in-process, in one fresh module namespace (a
  file's blocks build on each other), starting from jax's default configuration (``jax_enable_x64``
  off, as in a fresh session). A failure names the markdown file and the line of the failing block,
  and its traceback points at lines of the markdown file.
* expected output: a ```text block that directly follows a python block (blank lines between them at
  most) is that block's expected stdout. It must match line by line, where runs of whitespace count as
  one space, every number may differ (the block's own ``assert`` statements check the values that
  matter), ``...`` inside a line matches any text, and a line that is only ``...`` matches one or more
  lines.
* skipping: a block whose first line is ``# doc: skip (reason)`` is not run; each one is reported as a
  skipped test with its file, line and reason (``-ra`` lists them). A skip without a reason fails.
* shell: every command of a ```bash / ```sh / ```shell / ```console block, and every command line
  (``python ...``, ``pip ...``, ``pytest ...``, ``mkdocs ...``, ``bash ...``) of an unlabelled or
  ```text block, is checked:
  - ``python -m experiments.X --config=configs/Y.py ...``: the module and the config exist, and the
    flags parse exactly as the app parses them (absl + ml_collections, overrides applied, the locked
    config resolved, the experiment's own ``check(config)`` where it has one). The experiment is also
    run end to end with ``--config.smoke=True`` in a temporary workdir when its smoke run takes at most
    ``SMOKE_RUN_MAX_S`` (measured: `SMOKE_SECONDS`); the slower smoke runs are run by
    tests/test_unification.py and tests/test_training.py, and a new experiment must be measured and added
    to `SMOKE_SECONDS` before its command may appear in the docs;
  - ``python path/script.py --flag ...``: the script exists and defines every flag used;
  - ``pip install -e ".[extra]"``: every extra exists in pyproject.toml;
  - ``pytest ...`` / ``python -m pytest ...``: pytest (and pytest-xdist for ``-n``) is installed and every
    path given exists;
  - ``mkdocs ...``: mkdocs.yml exists; ``bash FILE``: the file exists;
  - anything else fails: add a rule here.
* ``mkdocs build --strict`` into a temporary folder must succeed without a warning (mkdocs.yml).
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
import traceback
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Seconds of `python -m experiments.X --config=configs/X.py --config.smoke=True --workdir=DIR`, measured
# on the 2-core CPU machine (jax 0.10.2). Smoke runs up to SMOKE_RUN_MAX_S run here; the others run
# in-process in the test named beside them, and here their flags are parsed and checked only.
SMOKE_SECONDS = {
    "collision": 5,       # also tests/test_dynamics.py
    "crowding": 17,       # tests/test_dynamics.py runs it (17 s with the process start, 2026-12-02)
    "recall": 15,         # tests/test_training.py::test_recall_smoke_end_to_end
    "mqar": 20,           # tests/test_training.py::test_mqar_smoke_end_to_end
    "mqar_figure4": 25,   # tests/test_mqar_figure4.py::test_smoke_end_to_end
    "unification": 18,    # tests/test_unification.py::test_experiment_writes_the_table
}
SMOKE_RUN_MAX_S = 10      # keeps this whole file under a minute on 2 cores

SHELL_LANGS = {"bash", "sh", "shell", "console"}
COMMAND_WORDS = ("python", "python3", "pip", "pytest", "mkdocs", "bash")
SKIP_RE = re.compile(r"#\s*doc:\s*skip\b(.*)$")
FENCE_RE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


# ----------------------------------------------------------------------------------------------------
# markdown: fenced blocks
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Block:
    path: str                 # relative to the repository root
    line: int                 # 1-based line of the opening fence
    lang: str                 # first word of the info string, lower case ("" when unlabelled)
    code: str
    end: int                  # 1-based line of the closing fence
    output: "Block | None" = None   # the ```text block of expected output that follows, if any

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def skip_reason(self):
        """None (run it), or the reason given by ``# doc: skip (reason)`` on the first code line."""
        first = next((l.strip() for l in self.code.splitlines() if l.strip()), "")
        match = SKIP_RE.match(first)
        if not match:
            return None
        reason = match.group(1).strip()
        if not (reason.startswith("(") and reason.endswith(")") and reason[1:-1].strip()):
            raise ValueError(f"{self.where}: `# doc: skip` needs a reason in parentheses: "
                             f"`# doc: skip (why this block cannot run)`; got {first!r}.")
        return reason[1:-1].strip()


def parse_blocks(text: str, path: str) -> list[Block]:
    """The fenced code blocks of a markdown text, with expected-output blocks attached."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE_RE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, info = len(match["indent"]), match["fence"], match["info"].strip()
        body, j = [], i + 1
        while j < len(lines):
            close = FENCE_RE.match(lines[j])
            if close and close["fence"][0] == fence[0] and len(close["fence"]) >= len(fence) and not close["info"].strip():
                break
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        if j == len(lines):
            raise ValueError(f"{path}:{i + 1}: code block never closed")
        lang = info.split()[0].lower().lstrip("{.").rstrip("}") if info else ""
        blocks.append(Block(path, i + 1, lang, "\n".join(body) + "\n", j + 1))
        i = j + 1
    for previous, block in zip(blocks, blocks[1:]):
        between = lines[previous.end:block.line - 1]
        if previous.lang == "python" and block.lang == "text" and all(not l.strip() for l in between):
            previous.output = block
    return blocks


def doc_files() -> list[str]:
    files = ["README.md"] + sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
    return [f for f in files if os.path.exists(os.path.join(ROOT, f))]


def blocks_of(path: str) -> list[Block]:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return parse_blocks(f.read(), path)


# ----------------------------------------------------------------------------------------------------
# expected output
# ----------------------------------------------------------------------------------------------------

NUMBER = r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?(?![\w])"


def _normalize(text: str) -> str:
    """Whitespace runs as one space; none inside brackets' edges (numpy pads its arrays: ``[ 5 27]``)."""
    lines = [re.sub(r"\s*([\])])", r"\1", re.sub(r"([\[(])\s*", r"\1", re.sub(r"\s+", " ", line))).rstrip()
             for line in text.splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def _line_pattern(line: str) -> str:
    parts = []
    for piece in line.split("..."):
        out, last = [], 0
        for m in re.finditer(NUMBER, piece):
            out.append(re.escape(piece[last:m.start()]))
            out.append(NUMBER)
            last = m.end()
        out.append(re.escape(piece[last:]))
        parts.append("".join(out))
    return ".*?".join(parts)


def output_matches(want: str, got: str) -> bool:
    """Whether ``got`` (stdout) matches the expected output ``want`` (see the module docstring)."""
    pieces = [r"[\s\S]*?" if line.strip() == "..." else _line_pattern(line)
              for line in _normalize(want).split("\n")]
    return re.fullmatch("\n".join(pieces), _normalize(got)) is not None


# ----------------------------------------------------------------------------------------------------
# python blocks
# ----------------------------------------------------------------------------------------------------

PYTHON_FILES = [f for f in doc_files() if any(b.lang in ("python", "py") for b in blocks_of(f))]
SKIPPED = [b for f in doc_files() for b in blocks_of(f) if b.skip_reason is not None]


def run_python_blocks(path: str) -> int:
    """Run the python blocks of one markdown file in order in one fresh namespace; return how many ran."""
    import jax

    name = "docs_" + re.sub(r"\W", "_", path)
    module = types.ModuleType(name)
    module.__file__ = os.path.join(ROOT, path)
    sys.modules[name] = module
    x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)     # a fresh session's default
    ran = 0
    try:
        for block in blocks_of(path):
            if block.lang not in ("python", "py") or block.skip_reason is not None:
                continue
            code = compile("\n" * block.line + block.code, os.path.join(ROOT, path), "exec")
            stdout = io.StringIO()
            try:
                with contextlib.redirect_stdout(stdout):
                    exec(code, module.__dict__)  # noqa: S102 (the documentation is the code under test)
            except BaseException as error:  # noqa: BLE001
                if isinstance(error, KeyboardInterrupt):
                    raise
                trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
                pytest.fail(f"{block.where}: the python block starting here failed: {type(error).__name__}: "
                            f"{error}\n--- its stdout ---\n{stdout.getvalue()}\n--- traceback ---\n{trace}",
                            pytrace=False)
            if block.output is not None and not output_matches(block.output.code, stdout.getvalue()):
                pytest.fail(f"{block.where}: the output of the python block starting here does not match the "
                            f"```text block at {block.output.where} (numbers may differ, `...` matches "
                            f"anything).\n--- expected ---\n{block.output.code}\n--- got ---\n{stdout.getvalue()}",
                            pytrace=False)
            ran += 1
    finally:
        jax.config.update("jax_enable_x64", x64)
        sys.modules.pop(name, None)
    return ran


@pytest.mark.parametrize("path", PYTHON_FILES)
def test_python_blocks_run(path):
    assert run_python_blocks(path) > 0, f"{path}: every python block is marked `# doc: skip`"


if SKIPPED:
    @pytest.mark.parametrize("block", SKIPPED, ids=[b.where for b in SKIPPED])
    def test_marked_blocks_are_reported(block):
        pytest.skip(f"{block.where}: ```{block.lang} block marked `# doc: skip` ({block.skip_reason})")


def test_tutorial_shows_what_the_compiler_chose():
    """The tutorial's explain output is shown, and checked, with its lowering lines."""
    blocks = blocks_of("docs/tutorial.md")
    explain = [b for b in blocks if b.lang == "python" and "filters.explain(" in b.code]
    assert explain and explain[0].output is not None, "docs/tutorial.md: print(filters.explain(model)) and its output"
    shown = explain[0].output.code
    for line in ("Lowerings:", "sequential  applies", "associative applies", "chunked     does not apply",
                 "auto        -> sequential on cpu"):
        assert line in shown, f"{explain[0].output.where}: the explain output should show {line!r}"
    assert any(b.lang == "python" and "training.train(" in b.code and b.output is not None for b in blocks), \
        "docs/tutorial.md: the training block and its printed losses"


# ----------------------------------------------------------------------------------------------------
# shell commands
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Command:
    where: str
    tokens: list


def _command_lines(block: Block) -> list[tuple[int, str]]:
    """``(line, command)`` of a block: every line of a shell block, the command lines of other blocks;
    backslash continuations joined, ``$`` prompts dropped."""
    out, pending, start = [], "", None
    for offset, raw in enumerate(block.code.splitlines()):
        line = raw.strip()
        if line.startswith("$ "):
            line = line[2:]
        if not pending:
            start = block.line + 1 + offset
            if not line or line.startswith("#"):
                continue
            if block.lang not in SHELL_LANGS and line.split()[0] not in COMMAND_WORDS:
                continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def doc_commands() -> list[Command]:
    commands = []
    for path in doc_files():
        for block in blocks_of(path):
            if block.lang in ("python", "py") or block.skip_reason is not None:
                continue
            for line, text in _command_lines(block):
                tokens = shlex.split(text, comments=True)
                command = []
                for token in tokens + ["&&"]:
                    if token in ("&&", "||", ";", "|"):
                        if command:
                            commands.append(Command(f"{path}:{line}", command))
                        command = []
                    else:
                        command.append(token)
    return commands


COMMANDS = doc_commands()


def _experiment_name(tokens):
    return tokens[2].split(".", 1)[1] if len(tokens) > 2 and tokens[2].startswith("experiments.") else None


def _command_id(command: Command) -> str:
    name = _experiment_name(command.tokens) if command.tokens[:2] == ["python", "-m"] else None
    if name is not None:
        mode = "smoke" if SMOKE_SECONDS.get(name, 1e9) <= SMOKE_RUN_MAX_S else "parse"
        return f"{command.where}-experiments.{name}-{mode}"
    return f"{command.where}-{' '.join(command.tokens[:3])}"


_SMOKE_DONE: dict = {}


def _parse_experiment_flags(module: str, config_path: str, args: list[str]):
    """The config an app would run with: absl flags parsed as `experiments.*` define them."""
    import warnings

    from absl import flags
    from ml_collections import config_flags

    from experiments import common

    args = common.last_override_wins(["prog", *args])[1:]      # a field given twice: its last value
    common.check_command_line(["prog", *args], config_path)     # a misspelled field, as the app reports it
    values = flags.FlagValues()
    with warnings.catch_warnings():   # ml_collections loads config files with the deprecated load_module
        warnings.simplefilter("ignore", DeprecationWarning)
        # ml_collections reads the `--config.field=value` overrides from sys_argv, not from the parse call
        config_flags.DEFINE_config_file("config", config_path, "Experiment config.", flag_values=values,
                                        sys_argv=["prog", *args])
        flags.DEFINE_string("workdir", None, "Where results go.", flag_values=values)
        values(["prog", *args])
    config = common.resolve_flags(values)                       # smoke settings, then the overrides
    app = importlib.import_module(module)
    if hasattr(app, "check"):
        app.check(config)
    return config


def _check_experiment(command: Command, tmp_path) -> None:
    tokens, where = command.tokens, command.where
    module, name = tokens[2], _experiment_name(tokens)
    assert os.path.exists(os.path.join(ROOT, *module.split(".")) + ".py"), f"{where}: no module {module}"
    args = tokens[3:]
    configs = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    assert configs, f"{where}: {module} without --config=configs/....py"
    assert os.path.exists(os.path.join(ROOT, configs[0])), f"{where}: no config file {configs[0]}"
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        _parse_experiment_flags(module, configs[0], args)
    except Exception as error:  # noqa: BLE001
        pytest.fail(f"{where}: `{' '.join(tokens)}` does not parse: {type(error).__name__}: {error}", pytrace=False)
    finally:
        os.chdir(cwd)
    assert name in SMOKE_SECONDS, (
        f"{where}: experiments.{name} has no measured smoke time: time `python -m {module} --config={configs[0]} "
        "--config.smoke=True --workdir=DIR` and add it to SMOKE_SECONDS in tests/test_docs.py")
    if SMOKE_SECONDS[name] > SMOKE_RUN_MAX_S:
        return                                   # run in-process by the test named in SMOKE_SECONDS
    key = (module, configs[0])
    if key not in _SMOKE_DONE:
        workdir = str(tmp_path / "workdir")
        run = subprocess.run([sys.executable, "-m", module, f"--config={configs[0]}", "--config.smoke=True",
                              f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
        assert run.returncode == 0, f"{where}: the smoke run of {module} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
        assert os.path.exists(os.path.join(workdir, "results.json")), f"{where}: {module} wrote no results.json"
        _SMOKE_DONE[key] = True


def _pyproject_extras() -> set:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        raw = f.read()
    try:
        import tomllib
        return set(tomllib.loads(raw.decode())["project"].get("optional-dependencies", {}))
    except ImportError:  # Python 3.10
        section = raw.decode().split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
        return set(re.findall(r"^([\w-]+)\s*=", section, re.M))


def _check_pip(command: Command) -> None:
    args = command.tokens[command.tokens.index("install") + 1:] if "install" in command.tokens else []
    assert args, f"{command.where}: only `pip install ...` is checked; got {' '.join(command.tokens)}"
    for arg in args:
        if arg.startswith("-"):
            continue
        match = re.fullmatch(r"(\.[\w./-]*)(?:\[([\w,-]+)\])?", arg)
        if match:                                 # the project itself, with extras
            assert os.path.exists(os.path.join(ROOT, match[1], "pyproject.toml")), f"{command.where}: no project at {arg}"
            missing = set((match[2] or "").split(",")) - {""} - _pyproject_extras()
            assert not missing, f"{command.where}: pyproject.toml has no extra {sorted(missing)}"


def _check_pytest(command: Command) -> None:
    tokens = command.tokens
    args = tokens[3:] if tokens[:3] == ["python", "-m", "pytest"] else tokens[1:]
    assert importlib.util.find_spec("pytest"), f"{command.where}: pytest is not installed"
    if "-n" in args or any(a.startswith("-n") and a[2:].isdigit() for a in args):
        assert importlib.util.find_spec("xdist"), f"{command.where}: `-n` needs pytest-xdist"
    for arg in args:
        if not arg.startswith("-") and ("/" in arg or arg.endswith(".py")):
            path = arg.split("::")[0]
            assert os.path.exists(os.path.join(ROOT, path)), f"{command.where}: no test path {path}"


def _check_script(command: Command) -> None:
    script = command.tokens[1]
    path = os.path.join(ROOT, script)
    assert os.path.exists(path), f"{command.where}: no script {script}"
    with open(path, encoding="utf-8") as f:
        source = f.read()
    for arg in command.tokens[2:]:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            assert f'"{flag}"' in source or f"'{flag}'" in source, f"{command.where}: {script} defines no {flag}"


@pytest.mark.parametrize("command", COMMANDS, ids=[_command_id(c) for c in COMMANDS])
def test_shell_command(command, tmp_path):
    env = []                                      # leading NAME=value assignments
    while command.tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", command.tokens[0]):
        env.append(command.tokens[0].split("=", 1)[0])
        command = Command(command.where, command.tokens[1:])
    tokens = command.tokens
    head = tokens[0]
    if head in ("python", "python3") and tokens[1:2] == ["-m"]:
        module = tokens[2]
        if module.startswith("experiments."):
            _check_experiment(command, tmp_path)
        elif module == "pytest":
            _check_pytest(command)
        elif module == "pip":
            _check_pip(Command(command.where, tokens[2:]))
        elif module == "mkdocs":
            assert os.path.exists(os.path.join(ROOT, "mkdocs.yml")), f"{command.where}: no mkdocs.yml"
        else:
            pytest.fail(f"{command.where}: no rule to check `python -m {module}`; add one to tests/test_docs.py")
    elif head in ("python", "python3"):
        _check_script(command)
    elif head == "pip":
        _check_pip(command)
    elif head == "pytest":
        _check_pytest(command)
    elif head == "mkdocs":
        assert os.path.exists(os.path.join(ROOT, "mkdocs.yml")), f"{command.where}: no mkdocs.yml"
        assert tokens[1:2] in (["build"], ["serve"]), f"{command.where}: mkdocs {tokens[1:2]}?"
    elif head == "bash":
        assert os.path.exists(os.path.join(ROOT, tokens[1])), f"{command.where}: no file {tokens[1]}"
    elif head.endswith(".sh"):                    # a shell script of the repo: present, executable, parses
        path = os.path.join(ROOT, head)
        assert os.path.exists(path) and os.access(path, os.X_OK), f"{command.where}: no executable {head}"
        syntax = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
        assert syntax.returncode == 0, f"{command.where}: {head} does not parse: {syntax.stderr}"
        with open(path, encoding="utf-8") as f:
            source = f.read()
        for name in env:
            assert "${" + name in source or "$" + name in source, f"{command.where}: {head} does not read ${name}"
    else:
        pytest.fail(f"{command.where}: no rule to check `{' '.join(tokens)}`; add one to tests/test_docs.py")


def test_every_doc_command_is_checked():
    """The commands of the quick start and of the experiments are among those checked (the extraction works)."""
    found = {" ".join(c.tokens[:3]) for c in COMMANDS}
    for expected in ("python -m experiments.unification", "python -m pytest", "mkdocs build --strict"):
        assert expected in found, (expected, sorted(found))


# ----------------------------------------------------------------------------------------------------
# the extraction and the matcher themselves
# ----------------------------------------------------------------------------------------------------

def test_extraction_and_output_matching():
    text = "\n".join([
        "# t", "", "```python", "print('a', 1.5)", "```", "", "```text", "a 2.5e-07", "```",
        "  ```python", "  # doc: skip (needs a GPU)", "  x = 1", "  ```",
        "```bash", "python -m pytest -q \\", "  -n 2  # all of it", "```",
        "```", "y = M q", "pip install -e \".[test]\"", "```",
    ])
    blocks = parse_blocks(text, "x.md")
    assert [(b.lang, b.line) for b in blocks] == [("python", 3), ("text", 7), ("python", 10), ("bash", 14), ("", 18)]
    assert blocks[0].output is blocks[1] and blocks[2].output is None
    assert blocks[2].skip_reason == "needs a GPU" and blocks[2].code.startswith("# doc:")
    assert _command_lines(blocks[3]) == [(15, "python -m pytest -q  -n 2  # all of it")]
    assert _command_lines(blocks[4]) == [(20, 'pip install -e ".[test]"')]
    with pytest.raises(ValueError, match="needs a reason"):
        _ = parse_blocks("```python\n# doc: skip\n```\n", "y.md")[0].skip_reason
    assert output_matches("loss 3.47 at step 10\n...\ndone", "loss  2.1e-3 at step 250\nx\ny\ndone\n")
    assert output_matches("P (2, 2, 8, 8) float32", "P (1, 3, 4, 4) float32")
    assert output_matches("context: [ 5 27 4 30]", "context: [17  3 9 30 ]")
    assert not output_matches("P (2, 2, 8, 8) float32", "P (2, 2, 8, 8) float64")
    assert output_matches("prior FullCovariance(matrix=((0.56, ...", "prior FullCovariance(matrix=((0.5625, 0.0625)))")
    assert not output_matches("a\nb", "a\nc")


def test_experiment_flag_check_catches_bad_overrides():
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        config = _parse_experiment_flags("experiments.mqar", "configs/mqar.py",
                                         ["--config=configs/mqar.py", "--config.num_steps=700", "--workdir=x"])
        assert config.num_steps == 700                        # (at least the config's warm-up of 300 steps)
        with pytest.raises(Exception, match="num_stepz"):      # a typo in a field
            _parse_experiment_flags("experiments.mqar", "configs/mqar.py", ["--config.num_stepz=7"])
        with pytest.raises(Exception, match="num_steps"):      # a value of the wrong type
            _parse_experiment_flags("experiments.mqar", "configs/mqar.py", ["--config.num_steps=abc"])
    finally:
        os.chdir(cwd)


# ----------------------------------------------------------------------------------------------------
# the site
# ----------------------------------------------------------------------------------------------------

def test_mkdocs_builds_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings_handlers") is None:
        pytest.fail("mkdocs and mkdocstrings[python] are not installed: pip install -e '.[test]' (or '.[docs]')")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    log = run.stdout + run.stderr
    assert run.returncode == 0 and "WARNING" not in log, f"mkdocs build --strict failed:\n{log[-5000:]}"
    assert os.path.exists(tmp_path / "site" / "api" / "filters" / "index.html")
