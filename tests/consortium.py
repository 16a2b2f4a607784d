"""A consortium for tests: an authority, and hospitals that each make their own key and have the
authority sign it, as docs/deploy.md walks through."""

from __future__ import annotations

import shutil
from pathlib import Path

from fedward.certificates import Identity, create_authority, sign_request, write_request


def enrol(authority: Path, site: Path, name: str) -> Identity:
    """What a hospital and the authority each do: the key is made at the site, the request
    travels to the authority, the certificate and the authority's public files travel back."""
    _, request = write_request(site, name, ["127.0.0.1"])
    inbox = authority / "requests"
    inbox.mkdir(exist_ok=True)
    certificate = sign_request(authority, shutil.copy(request, inbox / request.name))
    shutil.copy(certificate, site / f"{name}.crt")
    publish(authority, site)
    return Identity(site, name)


def publish(authority: Path, site: Path) -> None:
    for public in ("ca.crt", "crl.pem"):
        shutil.copy(authority / public, site / public)


def consortium(folder: Path, names: list[str]) -> tuple[Path, dict[str, Identity]]:
    """An authority in `folder`/authority and an enrolled identity per name in `folder`/NAME."""
    authority = folder / "authority"
    create_authority(authority)
    return authority, {name: enrol(authority, folder / name, name) for name in names}
