"""Every relative link in the docs resolves: the file exists, and an #anchor into a markdown file names one of its
headings. Docs are read by people who click and by tools that follow links (llms.txt); a renamed file or heading
must fail here rather than in front of a reader."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The sibling checkout of the shared contracts (CI lays out <dir>/main beside <dir>/shared).
OUTSIDE_ROOTS = ("shared",)

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
HTML_ANCHOR = re.compile(r"""<a\s+(?:[^>]*\s)?(?:id|name)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target); the target may be <bracketed> and may carry a "title".
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


@dataclass(frozen=True)
class Link:
    source: Path
    line: int
    target: str

    def __str__(self) -> str:
        return f"{self.source.relative_to(ROOT)}:{self.line}: {self.target}"


def documents() -> list[Path]:
    """The files a reader or a tool starts from: README.md, llms.txt, docs/**/*.md and the READMEs beside
    shipped configuration."""
    candidates = [ROOT / "README.md", ROOT / "llms.txt", ROOT / "dashboards" / "README.md"]
    candidates.append(ROOT / "deploy" / "README.md")
    found = [path for path in candidates if path.is_file()]
    return found + sorted((ROOT / "docs").rglob("*.md"))


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """Numbered lines outside fenced code blocks: a link or heading inside a code sample is not one."""
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if match:
            marker = match.group(1)
            if fence is None:
                fence = marker
            elif marker[0] == fence[0] and len(marker) >= len(fence):
                fence = None
            continue
        if fence is None:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: markup removed, lower case, every character that is not a letter,
    digit, underscore, hyphen or space dropped, spaces turned into hyphens (no trimming or collapsing)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags render nothing
    text = text.replace("`", "")
    text = re.sub(r"(\*{1,3}|(?<!\w)_{1,3}|_{1,3}(?!\w))", "", text)  # emphasis markers, not snake_case
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor a markdown file offers: its headings' slugs (a repeated slug gets -1, -2, ... as on GitHub)
    and explicit HTML anchors."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(text):
        found.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[Link]:
    """The relative links of a file (absolute URLs and mail addresses are someone else's to keep alive)."""
    result = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        bare = INLINE_CODE.sub("", line)
        targets = [m.group(1) for m in INLINE_LINK.finditer(bare)]
        definition = REFERENCE_DEFINITION.match(bare)
        if definition:
            targets.append(definition.group(1))
        for target in targets:
            target = target.strip("<>")
            if target and not SCHEME.match(target) and not target.startswith("//"):
                result.append(Link(path, number, target))
    return result


def problem(link: Link) -> str | None:
    """Why the link does not resolve, or None when it does."""
    path_part, _, fragment = link.target.partition("#")
    path_part = unquote(path_part.split("?", 1)[0])
    target = (link.source.parent / path_part).resolve() if path_part else link.source
    try:
        inside = target.relative_to(ROOT.parent)
    except ValueError:
        return "points outside the checkout's parent folder"
    if not target.is_relative_to(ROOT) and inside.parts[0] not in OUTSIDE_ROOTS:
        return "points outside the repository"
    if not target.exists():
        return "no such file"
    if fragment and target.suffix == ".md" and unquote(fragment) not in anchors(target.read_text(encoding="utf-8")):
        return f"no heading with the anchor #{fragment} in {target.name}"
    return None


DOCUMENTS = documents()


def test_the_maps_are_checked() -> None:
    names = {path.relative_to(ROOT).as_posix() for path in DOCUMENTS}
    assert {"README.md", "llms.txt", "docs/progress.md", "dashboards/README.md"} <= names


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(path: Path) -> None:
    if not (ROOT.parent / "shared").is_dir():
        pytest.skip("../shared (the contracts checkout) is not beside this repository")
    broken = [f"{link} ({reason})" for link in links(path) if (reason := problem(link)) is not None]
    assert not broken, "broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Where does X live", "where-does-x-live"),
        ("Partitions of `usage_events`", "partitions-of-usage_events"),
        ("Roles of `serve`", "roles-of-serve"),
        ("`lagSeconds` and `status`", "lagseconds-and-status"),
        ("Requests, errors & latency: p95/p99", "requests-errors--latency-p95p99"),
        ("A [linked](other.md#x) *emphasised* heading", "a-linked-emphasised-heading"),
        ("Café 1.0 (draft)", "café-10-draft"),
    ],
)
def test_slugs_follow_github(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor


def test_repeated_headings_are_numbered_and_code_is_not_a_heading() -> None:
    text = '# Notes\n\n## Example\n\n```sh\n# not a heading\n```\n\n## Example\n\n<a id="custom"></a>\n'
    assert anchors(text) == {"notes", "example", "example-1", "custom"}


def test_links_in_code_are_not_links(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        '[a](a.md) `[b](b.md)` ![c](img/c.png) [d](https://example.com) [e](#top) [f](<g h.md#i> "t")\n'
        "```\n[x](x.md)\n```\n[ref]: ref.md\n",
        encoding="utf-8",
    )
    assert [link.target for link in links(page)] == ["a.md", "img/c.png", "#top", "g h.md#i", "ref.md"]


def test_a_missing_file_and_a_missing_anchor_are_reported() -> None:
    readme = ROOT / "README.md"
    assert problem(Link(readme, 1, "docs/no-such-page.md")) == "no such file"
    assert problem(Link(readme, 1, "docs/operations.md#no-such-heading")) is not None
    assert problem(Link(readme, 1, "docs/operations.md#stopping")) is None
    assert problem(Link(readme, 1, "#tests")) is None
    assert problem(Link(readme, 1, "../../etc/passwd")) is not None
