"""moto's S3 server on loopback as the off-site backup store, with a bucket made for it.

Credentials are fake but handled as secrets: stand-in secrets SANDBOX_S3_ACCESS_KEY_ID and
SANDBOX_S3_SECRET_ACCESS_KEY (files in `<state>/secrets`, and this process' environment), which
platform.yaml references as ``{env: NAME}``.
"""

from __future__ import annotations

import os
import sys

from sandbox._common import SandboxLike, free_port, http_ok, wait_for

BUCKET = "gitlab-backups"
ACCESS_ENV = "SANDBOX_S3_ACCESS_KEY_ID"
SECRET_ENV = "SANDBOX_S3_SECRET_ACCESS_KEY"


def start_s3(sb: SandboxLike) -> None:
    port = free_port()
    proc = sb.spawn("s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                    env={"MOTO_S3_DEFAULT_MAX_KEYS": "1000"})
    url = f"http://127.0.0.1:{port}"
    wait_for(http_ok(f"{url}/moto-api/"), "moto S3 server", 30, proc, sb.log_of("s3"))
    sb.urls["s3"] = url
    access, secret = sb.secret(ACCESS_ENV), sb.secret(SECRET_ENV)
    import boto3

    boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=access,
                 aws_secret_access_key=secret).create_bucket(Bucket=BUCKET)
    sb.config["backup_store"] = {
        "kind": "s3", "endpoint_url": url, "bucket": BUCKET, "prefix": "gitlab/", "region": "us-east-1",
        "access_key_id": {"env": ACCESS_ENV}, "secret_access_key": {"env": SECRET_ENV},
    }
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
