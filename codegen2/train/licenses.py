"""License detection for ``codegen2 data build``: free-form names and license texts -> SPDX ids, SPDX
expressions checked against an allow-list, and an installed distribution's license from its metadata.

Heuristic by design (see data.py): what is not recognised is refused, never guessed permissive.
"""

from __future__ import annotations

import re
from importlib.metadata import PathDistribution
from pathlib import Path

DEFAULT_LICENSES = ("MIT", "MIT-0", "BSD-2-Clause", "BSD-3-Clause", "Apache-2.0", "PSF-2.0", "ISC", "Unlicense", "0BSD",
                    "Zlib", "CC0-1.0")
# Free-form license names (metadata ``License:``, classifiers) -> SPDX-ish ids; first match wins, so the GNU
# variants come before plain GPL and the BSD variants before plain BSD.
_NAME_RULES = [(r"affero|agpl", "AGPL-3.0"), (r"lesser|library general|lgpl", "LGPL"),
               (r"general public|\bgpl", "GPL"), (r"mozilla|\bmpl\b", "MPL-2.0"),
               (r"python software foundation|\bpsf", "PSF-2.0"), (r"apache", "Apache-2.0"),
               (r"0bsd|zero.clause", "0BSD"), (r"bsd.?2|2.clause|two.clause|simplified|freebsd", "BSD-2-Clause"),
               (r"bsd", "BSD-3-Clause"),  # "BSD License" with no clause count: read as the stricter 3-clause
               (r"mit-0|mit no attribution", "MIT-0"), (r"\bmit\b|expat", "MIT"), (r"\bisc\b", "ISC"),
               (r"unlicense", "Unlicense"), (r"zlib", "Zlib"), (r"\bcc0\b|creative commons zero", "CC0-1.0")]
# License texts -> ids, on lowercased single-spaced text. The rule matching *earliest* wins: CPython's
# LICENSE.txt is the PSF license followed by the 0BSD text, a GPL-3.0 text mentions the Affero GPL later on.
_TEXT_RULES = [(r"gnu affero general public license", "AGPL-3.0"),
               (r"gnu (lesser|library) general public license", "LGPL"), (r"gnu general public license", "GPL"),
               (r"mozilla public license", "MPL-2.0"), (r"python software foundation license", "PSF-2.0"),
               (r"apache license,? version 2\.0", "Apache-2.0"), (r"permission is hereby granted, free of charge", "MIT"),
               (r"redistribution and use in source and binary forms", "BSD"),
               (r"distribute this software for any purpose with or without fee is hereby granted, provided", "ISC"),
               (r"distribute this software for any purpose with or without fee is hereby granted\.", "0BSD"),
               (r"this is free and unencumbered software released into the public domain", "Unlicense"),
               (r"altered source versions must be plainly marked", "Zlib"), (r"\bcc0 1\.0 universal", "CC0-1.0")]
_KNOWN = {lic.lower(): lic for lic in (*DEFAULT_LICENSES, "GPL-2.0", "GPL-3.0", "LGPL-2.1", "LGPL-3.0", "AGPL-3.0",
                                        "MPL-2.0", "BSL-1.0")}


def classify_license_text(text: str) -> str | None:
    """The license a LICENSE/COPYING text states, or None."""
    low = " ".join(re.sub(r"[*_#>`]", "", text).lower().split())
    hits = [(m.start(), lic) for pattern, lic in _TEXT_RULES if (m := re.search(pattern, low))]
    if not hits:
        return None
    lic = min(hits)[1]
    if lic == "BSD":  # the 3-clause text adds the no-endorsement clause
        return "BSD-3-Clause" if "endorse or promote" in low else "BSD-2-Clause"
    if lic == "MIT" and re.search(r"mit no attribution|furnished to do so\. the software is provided", low):
        return "MIT-0"  # MIT's grant without its one condition (keeping the notice)
    return lic


def normalize_license(expr: str | None, spdx: bool) -> str | None:
    """``"Apache License 2.0 OR mit"`` -> ``"Apache-2.0 OR MIT"``; None if a part is not recognised.

    ``spdx``: the parts are already SPDX ids (License-Expression, SPDX headers) and are only re-cased; otherwise
    they are free-form names, where parentheses are part of a name ("... v3 (GPLv3)"), not grouping. ``WITH``
    exceptions are dropped: the base license decides."""
    if not expr or expr.strip().upper() in ("UNKNOWN", "NONE"):
        return None
    out = []
    operators = r"(\s+(?:AND|OR)\s+|[()])" if spdx else r"(\s+(?:AND|OR)\s+)"
    for part in re.split(operators, re.sub(r"\s+WITH\s+[^\s()]+", "", expr.strip())):
        part = part.strip()
        if part in ("", "(", ")", "AND", "OR"):
            out.append(part)
        elif spdx or part.lower() in _KNOWN:
            out.append(_KNOWN.get(part.lower(), part))
        elif lic := next((lic for pattern, lic in _NAME_RULES if re.search(pattern, part.lower())), None):
            out.append(lic)
        else:
            return None
    return " ".join(p for p in out if p).replace("( ", "(").replace(" )", ")") or None


def license_allowed(expr: str | None, allow: set[str]) -> bool:
    """SPDX semantics over lowercased ``allow``: ``A OR B`` needs one, ``A AND B`` both; AND binds tighter."""
    tokens = re.findall(r"[()]|[^\s()]+", expr or "")
    pos = 0

    def parse(level: int) -> bool:  # level 0: OR of level 1; level 1: AND of level 2; level 2: id or (...)
        nonlocal pos
        if level == 2:
            tok, pos = tokens[pos], pos + 1
            if tok != "(":
                return tok.lower() in allow
            ok = parse(0)
            if tokens[pos] != ")":
                raise IndexError
            pos += 1
            return ok
        ok = parse(level + 1)
        while pos < len(tokens) and tokens[pos].upper() == ("OR", "AND")[level]:
            pos += 1
            rhs = parse(level + 1)
            ok = (ok or rhs) if level == 0 else (ok and rhs)
        return ok

    try:
        return bool(tokens) and parse(0) and pos == len(tokens)
    except IndexError:  # malformed expression: refuse
        return False


def valid_expression(expr: str) -> bool:
    """Whether ``expr`` is a well-formed SPDX expression (ids joined by AND / OR, with parentheses)."""
    ids = {t.lower() for t in re.findall(r"[^\s()]+", expr) if t.upper() not in ("AND", "OR", "WITH")}
    return license_allowed(expr, ids)


def dist_license(info: Path) -> str | None:
    """An installed distribution's license: License-Expression, License, classifiers, then License-File texts."""
    meta = PathDistribution(info).metadata
    if lic := normalize_license(meta.get("License-Expression"), spdx=True):
        return lic
    text = (meta.get("License") or "").strip()  # sometimes a name, sometimes the whole license text
    if lic := (classify_license_text(text) if "\n" in text or len(text) > 200 else normalize_license(text, False)):
        return lic
    names = [c.split("::")[-1] for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    if ids := sorted({lic for n in names if (lic := normalize_license(n, spdx=False))}):
        return " OR ".join(ids)  # several license classifiers mean a choice (e.g. "Apache OR BSD")
    files = [p for n in meta.get_all("License-File") or [] for p in (info / "licenses" / n, info / n) if p.is_file()]
    ids = sorted({lic for p in files if (lic := classify_license_text(p.read_text(errors="replace")))})
    return " AND ".join(ids) or None
