"""Cloud side: control plane, model pipeline and fallback server.

NOTE: never imports edge/. torch is used only inside cloud/pipeline.
"""
