"""The runtime: what one request runs on a loaded model. Generation decoders built from a
method spec (`generation`), classification policy runs that drop rows as they exit
(`classification`), and the method checks and calibration that classification methods
are fitted from (`calibration`). The public API (`earlyexit.api`) and the CLI serve requests
through it, and `earlyexit.evaluation` only scores and times what it does.
"""
