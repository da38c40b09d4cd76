"""Find credentials in repository files, rendered manifests, compiled pipelines and logs.

The platform keeps every credential in Kubernetes Secrets; nothing in git, in an image layer,
in a compiled pipeline or in a log line may carry one. This scanner backs that promise in tests
(`tests/test_no_secrets.py`) and can redact text before it is surfaced (e.g. pod logs attached
to a failed TrainJob).

Rules are deliberately specific (known token shapes, private-key headers, `password=literal`,
`Bearer <token>`, `scheme://user:<password>@host`) so that the repository scan stays at zero findings
without an allow-list. Placeholders (`CHANGE_ME`, `${VAR}`, `$(cmd)`, `<value>`, env-var names)
are not findings. A line containing ``secret-scan: allow`` is skipped; use it only for text that
documents a pattern, never for a value.

CLI: ``python -m medsight.platform.secret_scan [--repo DIR] [FILE ... | -]`` exits 1 on findings.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ALLOW_MARKER = "secret-scan: allow"
REDACTED = "***REDACTED***"
# Larger files are data, not configuration; DVC keeps them out of git anyway.
MAX_FILE_BYTES = 2_000_000
# Source files assign variables to sensitive names all the time (`token = resolve()`); only a
# quoted literal there is a credential.
QUOTED_ONLY_SUFFIXES = frozenset({".py", ".pyi", ".js", ".ts", ".go", ".rs", ".java", ".sh"})
_SKIP_DIRS = frozenset({".git", ".venv", "venv", "__pycache__", "node_modules", ".pytest_cache"})


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: re.Pattern[str]
    # Name of the group holding the secret value; None means the whole match.
    value_group: str | None = None
    # Values may be placeholders (CHANGE_ME, ${VAR}...) that are not findings.
    placeholder_ok: bool = False


@dataclass(frozen=True)
class Finding:
    source: str
    line: int
    rule: str
    # The offending line with the secret value replaced, so reports never re-leak it.
    excerpt: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.rule}: {self.excerpt}"


_SENSITIVE_KEY = (
    r"[A-Za-z0-9_.-]*?(?:password|passwd|passphrase|secret|secret[_-]?key"
    r"|secret[_-]?access[_-]?key|private[_-]?key|client[_-]?secret|api[_-]?key|apikey"
    r"|(?:access|auth|bearer|api|refresh|id|session|hf|github|gh|kfp|slack|pypi|npm)[_-]?token)"
)

RULES: tuple[Rule, ...] = (
    Rule("aws-access-key-id", re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b")),
    Rule("private-key", re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")),
    Rule(
        "github-token",
        re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{50,})\b"),
    ),
    Rule("slack-token", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}")),
    Rule("jwt", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")),
    Rule(
        "bearer-token",
        re.compile(r"(?i)\bbearer[ \t]+(?P<value>[A-Za-z0-9._~+/-]{20,}=*)"),
        value_group="value",
        placeholder_ok=True,
    ),
    Rule(
        "url-credentials",
        re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@'\"]+:(?P<value>[^\s@/'\"]+)@"),
        value_group="value",
        placeholder_ok=True,
    ),
    Rule(
        "secret-assignment",
        re.compile(
            rf"(?i)(?<![A-Za-z0-9])(?P<key>{_SENSITIVE_KEY})['\"]?[ \t]*(?::=|=|:)[ \t]*"
            r"(?P<value>\"[^\"\n]*\"|'[^'\n]*'|<[^>\n]*>|[^\s'\"#,;}\]]+)"
        ),
        value_group="value",
        placeholder_ok=True,
    ),
)

_PLACEHOLDER = re.compile(
    r"""(?ix)^(?:
        | none | null | nil | true | false | todo | tbd | \**redacted\** | \.\.\. | x{3,} | \*{3,}
        | <[^>]*> | \[[^\]]*\] | \$\{[^}]*\}? | \$[A-Za-z_][A-Za-z0-9_]* | \$\(.* | \{\{.*
        | \{[^}]*\} | %\(.*\)s | your[_-].* | (?:test|fake|dummy|sample)[\w.-]*
        | .*(?:change[_-]?me|changeit|placeholder|example|not[_-]?a[_-]?secret|dummy).*
    )$"""
)
# An env-var / Secret-key *name* (AWS_SECRET_ACCESS_KEY) in a reference, not a value.
_ENV_NAME = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+$")
# Values that are code or YAML structure rather than data (`token: str`, `password: |`).
_NON_LITERAL = re.compile(r"^(?:[|>][-+]?|str|bytes|int|Optional\[.*|os\.environ.*|self\..*)$")
_BASE64 = re.compile(r"^[A-Za-z0-9+/]{4,}={0,2}$")


def _unquote(value: str) -> tuple[str, bool]:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1], True
    return value, False


def is_placeholder(value: str) -> bool:
    """True for values that stand in for a secret (CHANGE_ME, ${VAR}, <token>, VAR_NAME...)."""
    value = value.strip()
    if _PLACEHOLDER.match(value) or _ENV_NAME.match(value) or _NON_LITERAL.match(value):
        return True
    # Kubernetes Secret data is base64: `Q0hBTkdFX01F` is CHANGE_ME and as harmless.
    if _BASE64.match(value) and len(value) % 4 == 0:
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return bool(_PLACEHOLDER.match(decoded.strip()) or _ENV_NAME.match(decoded.strip()))
    return False


def _line_findings(line: str, source: str, number: int, quoted_only: bool) -> list[Finding]:
    findings: list[Finding] = []
    spans: list[tuple[int, int, str]] = []
    for rule in RULES:
        for match in rule.pattern.finditer(line):
            group = rule.value_group or 0
            raw = match.group(group)
            start, end = match.span(group)
            if rule.value_group == "value" and rule.name == "secret-assignment":
                value, quoted = _unquote(raw)
                if quoted_only and not quoted:
                    continue
            else:
                value = raw
            if rule.placeholder_ok and is_placeholder(value):
                continue
            if any(s <= start < e for s, e, _ in spans):
                continue  # already reported by a more specific rule
            spans.append((start, end, rule.name))
    for start, end, name in sorted(spans):
        excerpt = (line[:start] + REDACTED + line[end:]).strip()
        findings.append(Finding(source, number, name, excerpt[:200]))
    return findings


def scan_text(text: str, source: str = "<text>", *, quoted_only: bool = False) -> list[Finding]:
    """Findings in `text` (a file's content, rendered YAML, a log)."""
    findings: list[Finding] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if ALLOW_MARKER in line:
            continue
        findings.extend(_line_findings(line, source, number, quoted_only))
    return findings


def redact(text: str) -> str:
    """`text` with every recognised secret value replaced by ***REDACTED*** (for logs)."""
    out_lines = []
    for line in text.splitlines(keepends=True):
        for rule in RULES:
            def _sub(match: re.Match[str], rule: Rule = rule) -> str:
                group = rule.value_group or 0
                value = _unquote(match.group(group))[0]
                if rule.placeholder_ok and is_placeholder(value):
                    return match.group(0)
                start, end = match.span(group)
                base = match.start(0)
                whole = match.group(0)
                return whole[: start - base] + REDACTED + whole[end - base :]

            line = rule.pattern.sub(_sub, line)
        out_lines.append(line)
    return "".join(out_lines)


def scan_file(path: Path, display: str | None = None) -> list[Finding]:
    """Findings in one file; binary and oversized files are skipped."""
    source = display or str(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return []
        data = path.read_bytes()
    except OSError as exc:
        raise OSError(f"secret scan: cannot read {source}: {exc}") from exc
    if b"\x00" in data[:8192]:
        return []
    text = data.decode("utf-8", errors="replace")
    return scan_text(text, source, quoted_only=path.suffix in QUOTED_ONLY_SUFFIXES)


def _walk(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
        files.extend(Path(dirpath, name) for name in filenames)
    return files


def repo_files(root: Path) -> list[Path]:
    """Tracked plus untracked-but-not-ignored files (what a commit could contain), plus the
    compiled pipelines, images and manifests even where .gitignore hides them."""
    root = root.resolve()
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-co", "--exclude-standard", "-z"],
            check=True,
            capture_output=True,
        ).stdout.decode()
        files = {root / rel for rel in out.split("\0") if rel}
    except (OSError, subprocess.CalledProcessError):
        files = set(_walk(root))  # not a git checkout (e.g. an unpacked source tarball)
    for extra in ("pipelines/compiled", "images", "manifests"):
        if (root / extra).is_dir():
            files.update(_walk(root / extra))
    return sorted(p for p in files if p.is_file())


def scan_paths(paths: Iterable[Path], root: Path | None = None) -> list[Finding]:
    findings: list[Finding] = []
    for path in paths:
        display = str(path.relative_to(root)) if root and path.is_relative_to(root) else str(path)
        findings.extend(scan_file(path, display))
    return findings


def scan_repo(root: Path) -> list[Finding]:
    root = root.resolve()
    return scan_paths(repo_files(root), root)


def scan_k8s_secrets(docs: Sequence[Mapping[str, Any]], source: str = "<manifests>") -> list[Finding]:
    """Every value of a rendered `kind: Secret` must be a placeholder: real credentials are
    created in the cluster (kubectl create secret / an external secret store), never rendered."""
    findings = []
    for doc in docs:
        if not doc or doc.get("kind") != "Secret":
            continue
        name = doc.get("metadata", {}).get("name", "?")
        for field in ("data", "stringData"):
            for key, value in (doc.get(field) or {}).items():
                text = str(value)
                if field == "data":
                    try:
                        text = base64.b64decode(text, validate=True).decode("utf-8")
                    except (binascii.Error, UnicodeDecodeError):
                        pass
                if not is_placeholder(text):
                    findings.append(
                        Finding(source, 0, "k8s-secret-value", f"Secret {name} {field}.{key}: {REDACTED}")
                    )
    return findings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, help="scan the repository at DIR")
    parser.add_argument("files", nargs="*", help="files to scan; '-' reads stdin (e.g. a log)")
    args = parser.parse_args(argv)
    findings: list[Finding] = []
    if args.repo:
        findings += scan_repo(args.repo)
    for name in args.files:
        if name == "-":
            findings += scan_text(sys.stdin.read(), "<stdin>")
        else:
            findings += scan_file(Path(name))
    for finding in findings:
        print(finding)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
