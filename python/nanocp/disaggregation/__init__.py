"""Prefill/decode disaggregation (--disaggregation-mode): a prefill server runs prompts and writes
their KV straight into the pages a decode server's instances reserved for it.

  decode router (nanocp_router.pd)      plans the placement, has the holders reserve it, picks
                                        a prefill server, starts the home once all KV landed
  prefill router (nanocp_router.prefill_router)   balances prefill instances by queued tokens
  prefill worker (prefill.KVSender)     after each forward, writes the step's K/V to the holders
  decode worker (decode.KVReceiver)     the pages' endpoint; reports each transfer's notice
  transfer backends (transfer.KVTransfer; nixl.NixlTransfer)   move slot runs, every layer
"""
