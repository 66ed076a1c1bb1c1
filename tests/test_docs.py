"""The README is a first screen that links every docs/ page; the pages' links and commands point at real files."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCS = [README, ROOT / "checkpoints" / "README.md", *PAGES]
MAX_README_WORDS = 1600

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# a repository file a command names: scripts/..., configs/... or train.py, in a code block or an inline command
COMMAND_PATH = re.compile(r"(?<![\w./=-])((?:scripts|configs)/[\w./-]+\.(?:py|yaml|sbatch|sh)|train\.py)\b")
INLINE_COMMAND = re.compile(r"`((?:python|bash|sbatch|torchrun) [^`\n]+)`")


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    prose = FENCE.sub("", path.read_text())
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", prose, re.M)}


def test_the_readme_is_a_first_screen_that_links_every_docs_page():
    text = README.read_text()
    assert PAGES, "docs/ has no pages"
    words = len(text.split())
    assert words < MAX_README_WORDS, f"README.md: {words} words; move detail into a docs/ page"
    linked = {(README.parent / t.split("#")[0]).resolve() for t in LINK.findall(text)}
    assert [p.name for p in PAGES if p.resolve() not in linked] == []


def test_every_relative_link_resolves_to_a_file_and_heading():
    broken = []
    for doc in DOCS:
        for target in LINK.findall(FENCE.sub("", doc.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}: no such file")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{doc.relative_to(ROOT)}: {target}: no such heading")
    assert broken == []


def test_every_file_a_documented_command_names_exists():
    named, missing = 0, []
    for doc in DOCS:
        text = doc.read_text()
        commands = FENCE.findall(text) + INLINE_COMMAND.findall(text)
        for path in {p for command in commands for p in COMMAND_PATH.findall(command)}:
            named += 1
            if not (ROOT / path).is_file():
                missing.append(f"{doc.relative_to(ROOT)}: {path}")
    assert named > 20  # the pattern still finds the commands' files
    assert missing == []
