"""Where the bot keeps its login in the store's settings (no nio here: doctor reads them)."""

SETTING_USER = "matrix.user_id"
SETTING_DEVICE = "matrix.device_id"
SETTING_TOKEN = "matrix.access_token"
# + a device id: which node's device it is, with a shared store (hot standby)
SETTING_DEVICE_OF = "matrix.device_node."
