"""Every ```python block of README.md and docs/**/*.md runs.

The blocks of one page run in order in one namespace (later blocks build on earlier ones); each page
gets a fresh namespace, a temporary working directory and a seeded torch. A block whose preceding
line is ``<!-- doc-test: skip REASON -->`` is skipped with that reason (for blocks that need a GPU,
the network, downloads or several processes). ```bash and other blocks are not run.
"""

from __future__ import annotations

import ast
import re
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import CodeType

import pytest
import torch

import ess_reg.functional.memory as ess_memory

ROOT = Path(__file__).resolve().parents[1]
SKIP_MARK = re.compile(r"^\s*<!--\s*doc-test:\s*skip\s*(?P<reason>.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")

# Pages whose blocks take more than about 10 s when run alone on the 2-core CPU (mostly importing
# torchmetrics, Lightning and transformers, then a Lightning fit and a Hugging Face Trainer run).
SLOW_PAGES = {"README.md", "docs/integrations.md", "docs/metric.md", "docs/tutorials/hf_mamba.md"}


@dataclass(frozen=True)
class Block:
    """One fenced ```python block: its first code line (1-based), source and skip reason."""

    line: int
    source: str
    skip: str | None


def python_blocks(text: str) -> list[Block]:
    """The ```python blocks of a Markdown text, in order, with the skip marker before each."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        end = i + 1
        closing = re.compile(rf"\s*{re.escape(fence[0])}{{{len(fence)},}}\s*")
        while end < len(lines) and not closing.fullmatch(lines[end]):
            end += 1
        if opening["info"].lower() in ("python", "py"):
            previous = next((line for line in reversed(lines[:i]) if line.strip()), "")
            marker = SKIP_MARK.match(previous)
            skip = (marker["reason"] or "skipped") if marker else None
            body = "\n".join(line[indent:] for line in lines[i + 1:end])
            blocks.append(Block(line=i + 2, source=body, skip=skip))
        i = end + 1
    return blocks


def compile_block(block: Block, page: Path) -> CodeType:
    """Compile a block with the line numbers it has in its page, so tracebacks point there."""
    tree = ast.parse(block.source, filename=str(page))
    ast.increment_lineno(tree, block.line - 1)
    return compile(tree, str(page), "exec")


def run_block(block: Block, page: Path, namespace: dict[str, object]) -> None:
    """Run a block in ``namespace``; a failure shows the traceback from the page's line on."""
    code = compile_block(block, page)
    try:
        exec(code, namespace)
        return
    except Exception as error:
        trace = "".join(traceback.format_exception(type(error), error, error.__traceback__.tb_next))
    pytest.fail(f"{page.relative_to(ROOT)}, block at line {block.line} failed:\n{trace}", pytrace=False)


def doc_pages() -> list[Path]:
    """README.md and every page under docs/ that holds at least one ```python block."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [page for page in pages if python_blocks(page.read_text(encoding="utf-8"))]


def page_param(page: Path) -> pytest.ParameterSet:
    """The page as a test parameter, named by its path, marked slow if listed in ``SLOW_PAGES``."""
    name = page.relative_to(ROOT).as_posix()
    marks = [pytest.mark.slow] if name in SLOW_PAGES else []
    return pytest.param(page, id=name, marks=marks)


def test_python_blocks_are_found_and_skip_markers_read() -> None:
    text = (
        "intro\n```python\na = 1\n```\n\n<!-- doc-test: skip needs a GPU -->\n```python\nb = 2\n```\n"
        "```bash\nls\n```\n````markdown\n```python\nc = 3\n```\n````\n"
    )
    blocks = python_blocks(text)
    assert [(b.line, b.source, b.skip) for b in blocks] == [(3, "a = 1", None), (8, "b = 2", "needs a GPU")]


def test_slow_pages_exist() -> None:
    pages = {page.relative_to(ROOT).as_posix() for page in doc_pages()}
    assert not SLOW_PAGES - pages, "SLOW_PAGES names a page without python blocks"


@pytest.mark.parametrize("page", [page_param(page) for page in doc_pages()])
def test_doc_page_examples_run(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, subtests: pytest.Subtests
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setattr(ess_memory, "_budget", ess_memory._budget)  # restored if a block sets a budget
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    torch.manual_seed(0)
    name = page.relative_to(ROOT).as_posix()
    namespace: dict[str, object] = {"__name__": f"doc_example_{page.stem}"}
    failed = False
    try:
        for block in python_blocks(page.read_text(encoding="utf-8")):
            if failed:  # later blocks build on the failed one
                break
            with subtests.test(msg=f"{name}:{block.line}"):
                if block.skip is not None:
                    pytest.skip(block.skip)
                failed = True
                run_block(block, page, namespace)
                failed = False
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
