"""Webhooks from Git forges: POST /hooks/NAME starts what [webhooks.NAME] names.

`forges` knows what each forge sends (signature, event, delivery id, push payload),
`matching` decides from the config what a push starts (pure), and `receiver` puts the
checks in order, counts deliveries and calls `App.trigger`. The HTTP side is api/hooks.py.
"""
