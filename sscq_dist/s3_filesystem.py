"""The s3fs filesystem behind every s3:// Location, shaped so storage's one retry policy
(sscq_dist.storage.with_retries) decides how often and how long a call is tried.

A module of its own so the class pickles by reference into Ray workers (fsspec rebuilds a
filesystem from its class and options, so settings live on the class, not the instance).
"""

from __future__ import annotations

import s3fs


def _drop_expect(request, **_) -> None:
    request.headers.pop("Expect", None)


class BoundedS3FileSystem(s3fs.S3FileSystem):
    """s3fs with one try per request and no `Expect: 100-continue`.

    - `retries = 1`: s3fs's own loop (5 tries by default, around every call and ranged
      read) is off; botocore's is off through the client config the caller passes.
    - botocore adds `Expect: 100-continue` to every PUT with a body, and aiohttp then waits
      for the server's "100 Continue" with no timeout at all, so one upload to a hung
      endpoint would never end. Without it the read timeout bounds uploads too. (SigV4
      never signs `Expect`.)
    """

    retries = 1

    async def set_session(self, refresh=False, kwargs={}):  # noqa: B006 - s3fs's signature
        client = await super().set_session(refresh, kwargs)
        if getattr(self, "_hooked_client", None) is not client:
            client.meta.events.register("before-send.s3", _drop_expect)
            self._hooked_client = client
        return client
