"""A throwaway certificate authority for tests: CA, server and client certificates made with the openssl CLI."""

import pathlib
import subprocess


def _openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _key_and_csr(name: str, subject: str, cwd: pathlib.Path) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", subject, cwd=cwd)


def _sign(name: str, extensions: str, cwd: pathlib.Path, ca: str = "ca") -> None:
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=cwd)


def make_certificates(root: pathlib.Path) -> dict[str, str]:
    """ca, server (localhost, 127.0.0.1) and client certificates with keys, plus a second CA's client ("rogue")."""
    root.mkdir(parents=True, exist_ok=True)
    for ca in ("ca", "rogue-ca"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
                 f"{ca}.key", "-out", f"{ca}.crt", "-days", "2", "-subj", f"/CN=rlhf-test-{ca}", cwd=root)
    _key_and_csr("server", "/CN=localhost", root)
    _sign("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n", root)
    _key_and_csr("client", "/CN=controller", root)
    _sign("client", "extendedKeyUsage=clientAuth\n", root)
    _key_and_csr("rogue", "/CN=rogue", root)
    _sign("rogue", "extendedKeyUsage=clientAuth\n", root, ca="rogue-ca")
    return {name: str(root / name) for name in (
        "ca.crt", "rogue-ca.crt", "server.crt", "server.key", "client.crt", "client.key", "rogue.crt", "rogue.key")}
