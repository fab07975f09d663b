"""Thin adapter over the ThingsBoard REST API (thingsboard.md §3): JSON in, JSON out.

Plain ``requests`` with the JWT rather than tb-rest-client's generated models: the bridge image then needs
no extra package, rule-chain metadata stays the exact JSON ThingsBoard sent (node configurations are free
form), and a field the generated client does not know yet cannot break us. The test double builds its
responses from tb-rest-client's models, so the shapes used here are checked against them.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Iterator
from urllib.parse import quote

import requests

from ..config import Settings

log = logging.getLogger(__name__)


class ThingsBoardError(Exception):
    def __init__(self, status: int, method: str, path: str, text: str):
        super().__init__(f"ThingsBoard {method} {path}: HTTP {status}: {text[:300]}")
        self.status = status


class ThingsBoard:
    """One tenant-administrator session. Logs in lazily and again once when the JWT expires (401)."""

    def __init__(self, url: str, username: str, password: str, timeout: float = 15.0):
        self.base = url.rstrip("/")
        self.username = username
        self._password = password
        self.timeout = timeout
        self.session = requests.Session()
        self._token: str | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> "ThingsBoard":
        if not settings.tb_url or not settings.tb_username or settings.tb_password is None:
            from ..config import ConfigError

            raise ConfigError(
                "ThingsBoard is not configured: set RACKTWIN_TB_URL, RACKTWIN_TB_USERNAME and "
                "RACKTWIN_TB_PASSWORD (or RACKTWIN_TB_PASSWORD_FILE)"
            )
        return cls(settings.tb_url, settings.tb_username, settings.tb_password.get_secret_value(),
                   settings.tb_timeout_s)

    def close(self) -> None:
        self.session.close()

    # -- plumbing --------------------------------------------------------------------------------------

    def login(self) -> None:
        resp = self.session.post(self.base + "/api/auth/login",
                                 json={"username": self.username, "password": self._password}, timeout=self.timeout)
        if resp.status_code != 200:
            raise ThingsBoardError(resp.status_code, "POST", "/api/auth/login", resp.text)
        self._token = resp.json()["token"]

    def request(self, method: str, path: str, *, params: dict | None = None, body: Any = None,
                ok_404: bool = False) -> Any:
        for attempt in (1, 2):
            with self._lock:
                if self._token is None:
                    self.login()
                token = self._token
            resp = self.session.request(method, self.base + path, params=params, json=body, timeout=self.timeout,
                                        headers={"X-Authorization": f"Bearer {token}"})
            if resp.status_code == 401 and attempt == 1:
                with self._lock:
                    if self._token == token:
                        self._token = None
                continue
            break
        if resp.status_code == 404 and ok_404:
            return None
        if resp.status_code >= 300:
            raise ThingsBoardError(resp.status_code, method, path, resp.text)
        return resp.json() if resp.content else None

    def paged(self, path: str, page_size: int, params: dict | None = None) -> Iterator[dict[str, Any]]:
        """Every element of a PageData listing, page by page."""
        page = 0
        while True:
            data = self.request("GET", path, params={**(params or {}), "pageSize": page_size, "page": page})
            yield from data.get("data") or []
            if not data.get("hasNext"):
                return
            page += 1

    # -- devices ---------------------------------------------------------------------------------------

    def devices(self, device_type: str | None, page_size: int = 100) -> Iterator[dict[str, Any]]:
        params = {"sortProperty": "name", "sortOrder": "ASC"}
        if device_type:
            params["type"] = device_type
        return self.paged("/api/tenant/devices", page_size, params)

    def device_by_name(self, name: str) -> dict[str, Any] | None:
        return self.request("GET", "/api/tenant/devices", params={"deviceName": name}, ok_404=True)

    def save_device(self, device: dict[str, Any], access_token: str | None = None) -> dict[str, Any]:
        return self.request("POST", "/api/device", params={"accessToken": access_token} if access_token else None,
                            body=device)

    def device_token(self, device_id: str) -> str | None:
        creds = self.request("GET", f"/api/device/{device_id}/credentials")
        return creds.get("credentialsId") if creds and creds.get("credentialsType") == "ACCESS_TOKEN" else None

    def server_attributes(self, device_id: str) -> dict[str, Any]:
        rows = self.request("GET", f"/api/plugins/telemetry/DEVICE/{device_id}/values/attributes/SERVER_SCOPE")
        return {row["key"]: row.get("value") for row in rows or []}

    def save_server_attributes(self, device_id: str, values: dict[str, Any]) -> None:
        self.request("POST", f"/api/plugins/telemetry/DEVICE/{device_id}/attributes/SERVER_SCOPE", body=values)

    def latest_timeseries(self, device_id: str, keys: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
        """{key: [{"ts": ms, "value": v}]}; strict data types so numbers come back as numbers."""
        params: dict[str, Any] = {"useStrictDataTypes": "true"}
        if keys:
            params["keys"] = ",".join(keys)
        return self.request("GET", f"/api/plugins/telemetry/DEVICE/{device_id}/values/timeseries", params=params) or {}

    def timeseries(self, device_id: str, keys: list[str], start_ms: int, end_ms: int,
                   limit: int = 100000) -> dict[str, list[dict[str, Any]]]:
        params = {"keys": ",".join(keys), "startTs": start_ms, "endTs": end_ms, "limit": limit, "agg": "NONE",
                  "orderBy": "ASC", "useStrictDataTypes": "true"}
        return self.request("GET", f"/api/plugins/telemetry/DEVICE/{device_id}/values/timeseries", params=params) or {}

    # -- device profiles -------------------------------------------------------------------------------

    def device_profile(self, name: str) -> dict[str, Any] | None:
        for profile in self.paged("/api/deviceProfiles", 100, {"textSearch": name}):
            if profile.get("name") == name:
                return profile
        return None

    def save_device_profile(self, profile: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/api/deviceProfile", body=profile)

    # -- rule chains -----------------------------------------------------------------------------------

    def rule_chains(self) -> Iterator[dict[str, Any]]:
        return self.paged("/api/ruleChains", 100, {"type": "CORE"})

    def rule_chain_by_name(self, name: str) -> dict[str, Any] | None:
        for chain in self.paged("/api/ruleChains", 100, {"type": "CORE", "textSearch": name}):
            if chain.get("name") == name:
                return chain
        return None

    def root_rule_chain(self) -> dict[str, Any] | None:
        return next((c for c in self.rule_chains() if c.get("root")), None)

    def rule_chain(self, chain_id: str) -> dict[str, Any] | None:
        return self.request("GET", f"/api/ruleChain/{quote(chain_id)}", ok_404=True)

    def save_rule_chain(self, chain: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/api/ruleChain", body=chain)

    def rule_chain_metadata(self, chain_id: str) -> dict[str, Any]:
        return self.request("GET", f"/api/ruleChain/{quote(chain_id)}/metadata")

    def save_rule_chain_metadata(self, metadata: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/api/ruleChain/metadata", body=metadata)
