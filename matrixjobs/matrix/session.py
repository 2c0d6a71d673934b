"""The bot's session: logging in (a token, the saved login, or the password), keeping its
device its own, and the crypto store that goes with that device."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from nio import Api, AsyncClient, AsyncClientConfig, LoginResponse, WhoamiResponse

from matrixjobs.app import App
from matrixjobs.config import MatrixConfig
from matrixjobs.logs import mask
from matrixjobs.matrix.crypto import Crypto, ServerKeys, open_store_dir
from matrixjobs.matrix.crypto_store import (
    PICKLE_KEY_ENV,
    CryptoStoreError,
    PickleKeyError,
    load_pickle_key,
)
from matrixjobs.matrix.sender import server_time_ms
from matrixjobs.matrix.settings import (
    SETTING_DEVICE,
    SETTING_DEVICE_OF,
    SETTING_TOKEN,
    SETTING_USER,
)

log = logging.getLogger(__name__)


class Session:
    """Logs `client` in as the configured user; `started_ms` is the homeserver's clock then."""

    def __init__(self, app: App, config: MatrixConfig, client: AsyncClient, crypto: Crypto,
                 store_dir: Path, key_file: Path) -> None:
        self.app = app
        self.config = config
        self.client = client
        self.crypto = crypto
        self.store_dir = store_dir
        self.key_file = key_file
        # The homeserver's clock when we logged in: older messages are never acted on.
        self.started_ms = 0
        self._key_source = ""

    def is_new(self, event: Any) -> bool:
        """Not ours, and sent after we logged in: older messages are never acted on."""
        return (event.sender != self.client.user_id
                and event.server_timestamp >= self.started_ms)

    async def forget_token(self) -> None:
        """The homeserver revoked our token: the next login must not try it again."""
        await self.app.set_setting(self._setting(SETTING_TOKEN), "")

    async def login(self) -> bool:
        try:
            return await self._authenticate() and await self._check_device()
        except PickleKeyError as exc:
            # Raised while nio loads the store, before it could make a new account.
            log.error("matrix: %s (the key from %s). It was left as it is and no new "
                      "device was made: set %s to the key it was made with (see "
                      "docs/encryption.md, The pickle key); retrying", exc, self._key_source,
                      PICKLE_KEY_ENV)
            return False

    async def _authenticate(self) -> bool:
        app, config = self.app, self.config
        if not self._open_crypto_store():
            return False
        saved_user, device, saved_token = await self._saved_login()
        token = config.access_token.get_secret_value() if config.access_token else None
        if token is None and saved_user == config.user_id:
            token = saved_token or None
        if token is not None:
            mask([token])
            self.client.access_token = token
            whoami = await self.client.whoami()
            if isinstance(whoami, WhoamiResponse):
                if not await self._own_device(whoami.device_id or device):
                    return False
                # The token's device decides which crypto store to load.
                self.client.restore_login(config.user_id, whoami.device_id or device, token)
                self.started_ms = server_time_ms(whoami)
                return True
            self.client.access_token = ""
            log.warning("matrix: the access token was refused (%s)", whoami)
            if config.password is None:
                return False
        if config.password is None:
            log.error("matrix: no password or access token for %s; set MATRIXJOBS_PASSWORD",
                      config.user_id)
            return False
        self.client.device_id = device  # reuse our device: no new one per restart
        response = await self.client.login(config.password.get_secret_value(),
                                           device_name=config.device_name)
        if not isinstance(response, LoginResponse):
            log.error("matrix: login as %s failed: %s", config.user_id, response)
            return False
        mask([response.access_token])
        self.started_ms = server_time_ms(response)
        await self._own_device(response.device_id)
        await app.set_setting(self._setting(SETTING_USER), config.user_id)
        await app.set_setting(self._setting(SETTING_DEVICE), response.device_id)
        await app.set_setting(self._setting(SETTING_TOKEN), response.access_token)
        return True

    async def _saved_login(self) -> tuple[str | None, str, str | None]:
        """The user, device and token this node saved. With a shared store, the login that
        migrate-store copied from a one-node store is this node's if its crypto store has
        that device (and no other node took it first)."""
        keys = (SETTING_USER, SETTING_DEVICE, SETTING_TOKEN)
        user, device, token = [await self.app.setting(self._setting(key)) for key in keys]
        if device is None and self._setting(SETTING_DEVICE) != SETTING_DEVICE:
            copied = [await self.app.setting(key) for key in keys]
            if (copied[1] and (self.store_dir / f"{self.config.user_id}_{copied[1]}.db").exists()
                    and await self._own_device(copied[1])):
                user, device, token = copied
        return user, device or "", token

    async def _own_device(self, device: str) -> bool:
        """With a shared store, is `device` this node's alone? A second node given the same
        access token would be the same device with another crypto store: encrypted rooms
        break for both, so it refuses (and says why) instead."""
        if not self.app.store_shared or not device:
            return True
        key, me = f"{SETTING_DEVICE_OF}{device}", self.app.config.worker.name
        owner = await self.app.setting(key)
        if owner and owner != me:
            log.error("matrix: device %s is already the bot's device on node %s (the same "
                      "access token?). Each node sharing the store needs its own device: give "
                      "this node the password (it logs in as a new device) or a token of its "
                      "own (see deploy/README.md, Hot standby); retrying", device, owner)
            return False
        if owner is None:
            await self.app.set_setting(key, me)
        return True

    def _setting(self, key: str) -> str:
        """The key of a setting of this node's own login. Nodes sharing a store (hot
        standby) must each be a device of their own: one device with two crypto stores
        cannot decrypt. Each keeps its device and token under its worker name."""
        if self.app.store_shared:
            return f"{key}@{self.app.config.worker.name}"
        return key

    def _open_crypto_store(self) -> bool:
        """The crypto store's directory, private, and the key nio pickles it with."""
        # nio keeps one crypto store per device id in here: the device must stay ours.
        try:
            open_store_dir(self.store_dir)
        except OSError as exc:
            log.error("matrix: cannot use the crypto store directory %s (%s): the service "
                      "user must be able to create it and own it; retrying", self.store_dir,
                      exc)
            return False
        try:
            key = load_pickle_key(self.config.pickle_key, self.key_file)
        except CryptoStoreError as exc:
            log.error("matrix: %s; retrying", exc)
            return False
        mask([key.value])
        self.client.config = replace(self.client.config, pickle_key=key.value)
        self._key_source = key.source
        return True

    async def _check_device(self) -> bool:
        """Does the homeserver hand out our crypto store's keys for our device? Without
        that nobody can encrypt for the bot, and every command stays unreadable."""
        olm = self.client.olm
        assert olm is not None
        found = await self.crypto.server_keys()
        if found is None:
            return False
        if found is ServerKeys.NONE and olm.account.shared:
            # nio believes its keys are up and would only send one-time keys.
            log.error("matrix: the homeserver has no keys for our device %s (was it signed "
                      "out?); uploading them again. Messages sent while they were missing "
                      "cannot be decrypted", self.client.device_id)
            olm.account.shared = False
            olm.save_account()
        if found is not ServerKeys.OTHER:
            return True
        return await self._new_device()

    async def _new_device(self) -> bool:
        """Our crypto store lacks the keys the homeserver has for our device (deleted or
        replaced): that device is lost to us; only a new one can decrypt again."""
        old, config = self.client.device_id, self.config
        lost = (f"the crypto store {self.store_dir} does not hold the keys the homeserver "
                f"has for our device {old} (was it deleted or replaced?)")
        if config.access_token is not None or config.password is None:
            log.error("matrix: %s. Restore it from a backup, or let the bot log in as a new "
                      "device: give it its password (MATRIXJOBS_PASSWORD) and no access "
                      "token. Retrying", lost)
            return False
        log.error("matrix: %s; logging in as a new device (messages sent to %s cannot be "
                  "decrypted)", lost, old)
        # Logged in aside: the old device keeps working in plain rooms if this fails.
        aside = AsyncClient(config.homeserver, config.user_id,
                            config=AsyncClientConfig(encryption_enabled=False))
        try:
            response = await aside.login(config.password.get_secret_value(),
                                         device_name=config.device_name)
        finally:
            await aside.close()
        if not isinstance(response, LoginResponse):
            log.error("matrix: login as a new device failed (%s); going on as %s, which "
                      "cannot read encrypted rooms until the next start", response, old)
            self.crypto.keep_server_keys = True
            return True
        mask([response.access_token])
        old_token = self.client.access_token
        self.client.store = None  # nio loads a crypto store only when none is loaded
        self.client.olm = None
        self.client.restore_login(config.user_id, response.device_id, response.access_token)
        await self._own_device(response.device_id)
        await self.app.set_setting(self._setting(SETTING_DEVICE), response.device_id)
        await self.app.set_setting(self._setting(SETTING_TOKEN), response.access_token)
        # Signing the old device out deletes it and its keys: nobody encrypts for it again.
        method, path = Api.logout(old_token)[:2]
        signed_out = await self.client.send(method, path, "{}")
        if signed_out.status != 200:
            log.warning("matrix: could not sign the old device %s out (HTTP %s); delete it "
                        "(Element: Sessions, or the admin API)", old, signed_out.status)
        return await self._check_device()
