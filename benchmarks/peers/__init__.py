"""The servers chatcore is measured against, each the plain room-broadcast server
its own documentation recommends. Every one speaks the same small protocol so the
load generator treats them alike: connect to ``/ws?user=U&room=R``, send
``{"type":"send","room":R,"text":T}``, receive ``{"type":"message",...}`` once per
room member other than the sender (chatcore's default: no echo).

Benchmark-only code: these modules import the ``bench`` extra.
"""
