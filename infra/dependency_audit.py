"""Audit the installed Python packages for known vulnerabilities, from PyPI's JSON API.

    python infra/dependency_audit.py                 # every package in this environment (`make audit`)
    python infra/dependency_audit.py -r pinned.txt   # name==version lines instead

PyPI's record of a release lists the OSV advisories that affect it (what pip-audit's default
service reads). This asks `/pypi/NAME/VERSION/json` for each package. Where a mirror answers only
the project page (`/pypi/NAME/json`, as this team's build machines do), that page's advisories are
those of the newest release, so they audit a package installed at its newest release; an older one
is reported as not audited, never as clean.

Exit status: 1 when a package has an advisory not accepted in infra/audit-accepted.txt (one
advisory id per line, `# why` after it), else 0. `--require-all` also fails when any package could
not be audited.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ACCEPTED = Path(__file__).with_name("audit-accepted.txt")
OWN_PACKAGE = "prefect-finetune"


@dataclass
class Audit:
    name: str
    version: str
    advisories: list[dict] = field(default_factory=list)
    source: str = ""  # which PyPI page answered
    not_audited: str = ""  # why, when no page could


def audit(name: str, version: str, index: str) -> Audit:
    public = version.split("+")[0]  # torch 2.13.0+cpu is PyPI's 2.13.0
    try:
        release = _get(f"{index}/{name}/{public}/json")
        if release is not None:
            return Audit(name, version, release.get("vulnerabilities", []), "release page")
        project = _get(f"{index}/{name}/json")
    except OSError as error:
        return Audit(name, version, not_audited=f"PyPI unreachable ({error})")
    if project is None:
        return Audit(name, version, not_audited="not on PyPI")
    newest = project["info"]["version"]
    if newest != public:
        return Audit(name, version, not_audited=f"no release page for {public}, and the project page "
                                                f"describes only the newest release ({newest})")
    return Audit(name, version, project.get("vulnerabilities", []), "project page (newest release)")


def _get(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return json.load(answer)
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise


def installed() -> dict[str, str]:
    found = {}
    for dist in importlib.metadata.distributions():
        name = _canonical(dist.metadata["Name"] or "")
        if name and name != OWN_PACKAGE:
            found[name] = dist.version
    return found


def pinned(path: Path) -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return {_canonical(name): version for name, version in (line.split("==") for line in lines if line)}


def accepted_ids(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    return {line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def report(audits: list[Audit], accepted: set[str]) -> tuple[list[str], int]:
    """The lines to print and the number of advisories not accepted."""
    lines, open_count = [], 0
    for item in audits:
        for advisory in item.advisories:
            ids = {advisory.get("id", "")} | set(advisory.get("aliases") or [])
            is_accepted = bool(ids & accepted)
            open_count += not is_accepted
            fixed = ", ".join(advisory.get("fixed_in") or []) or "no fix released"
            lines.append(f"{'accepted' if is_accepted else 'VULNERABLE'}: {item.name} {item.version} "
                         f"{advisory.get('id')} ({', '.join(advisory.get('aliases') or [])}); fixed in {fixed}; "
                         f"{advisory.get('link', '')}")
    skipped = [a for a in audits if a.not_audited]
    audited = len(audits) - len(skipped)
    lines.append(f"audited {audited} of {len(audits)} packages: {open_count} open advisories, "
                 f"{sum(len(a.advisories) for a in audits) - open_count} accepted")
    lines += [f"not audited: {a.name} {a.version}: {a.not_audited}" for a in skipped]
    return lines, open_count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-r", "--requirements", type=Path, help="name==version lines instead of this environment")
    parser.add_argument("--index", default="https://pypi.org/pypi", help="PyPI's JSON API")
    parser.add_argument("--accepted", type=Path, default=ACCEPTED)
    parser.add_argument("--require-all", action="store_true", help="fail when a package could not be audited")
    parser.add_argument("--json", type=Path, help="also write every package's result here")
    args = parser.parse_args(argv)
    packages = pinned(args.requirements) if args.requirements else installed()
    with ThreadPoolExecutor(16) as pool:
        audits = list(pool.map(lambda item: audit(*item, args.index.rstrip("/")), sorted(packages.items())))
    lines, open_count = report(audits, accepted_ids(args.accepted))
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps([vars(a) for a in audits], indent=1))
    if open_count:
        print(f"{open_count} known vulnerabilities: upgrade to a fixed version, or accept the advisory id in "
              f"{args.accepted} with the reason it does not apply", file=sys.stderr)
        return 1
    return 2 if args.require_all and any(a.not_audited for a in audits) else 0


if __name__ == "__main__":
    sys.exit(main())
