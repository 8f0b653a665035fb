"""One structlog configuration for the whole daemon: JSON lines for journald and log shippers,
readable console output when a person watches a terminal."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import structlog
from aiohttp.http_exceptions import HttpProcessingError


def configure(json: bool | None = None, level: int = logging.INFO) -> None:
    if json is None:
        json = not sys.stdout.isatty()
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str = "tiktokguard") -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)


class HttpServerLog(logging.Logger):
    """The `logger=` of an aiohttp server (the API, DoH). A request the client got wrong (a NUL
    in a header, a bad request line...) is answered 400 by aiohttp and its connection closed:
    that is counted, not logged, so no client can write tracebacks into the log at will. Any
    other error aiohttp reports is one `http_error` line (its traceback, if any, a field of it:
    a bug in a handler stays visible)."""

    def __init__(self, listener: str, malformed: Callable[[], None]) -> None:
        super().__init__(f"tiktokguard.{listener}", logging.DEBUG)
        self.listener = listener
        self.malformed = malformed

    def handle(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            self.malformed()
        elif record.levelno >= logging.WARNING:
            log = get_logger()
            log.error("http_error", listener=self.listener, message=record.getMessage(),
                      error=repr(error), exc_info=record.exc_info if error else None)


# Every event the daemon logs: name → (level, when it is logged). Admins and the SOC filter by
# these names; docs/reference.md is generated from this table, and a test fails when the code
# logs an event that is not here, or at another level.
EVENTS: dict[str, tuple[str, str]] = {
    "started": ("info", "serving: listen addresses, upstreams, rules, workers, config file"),
    "stopping": ("info", "SIGTERM/SIGINT: queries in flight are answered (at most 5 s)"),
    "stopped": ("info", "everything closed; the process exits 0"),
    "admin_token_created": ("info", "first start without tokens: the generated admin token's "
                                    "path"),
    "config_reloaded": ("info", "SIGHUP: the config re-read and in force"),
    "config_reload_failed": ("error", "SIGHUP: the config has an error; the one in force stays"),
    "restart_required": ("warning", "a reload changed keys that only a restart applies"),
    "tls_certificate_reload_failed": ("error", "SIGHUP: the certificate or key of the "
                                               "encrypted listeners could not be loaded; the "
                                               "ones in force stay"),
    "blocklists_reloaded": ("info", "the lists re-read (SIGHUP, a file changed, the API)"),
    "blocklists_reload_failed": ("error", "a list file is missing or has a bad line (file and "
                                          "line); the lists in force stay"),
    "blocklist_lines_skipped": ("warning", "lines a list load skipped (adblock modifiers, or "
                                           "what a URL list holds that does not parse), per "
                                           "list, with examples"),
    "blocklist_fetched": ("info", "a URL list changed at its source: the new copy is kept and "
                                  "loaded"),
    "blocklist_fetch_failed": ("error", "a URL list could not be fetched or was not a list; the "
                                        "last good copy stays (retried within 5 min)"),
    "store_unavailable": ("error", "the shared database cannot be reached: DNS decides from the "
                                   "last known devices, device changes answer 503, reconnecting"),
    "store_reconnected": ("info", "the shared database is back; every device read again"),
    "policy_violation": ("warning", "a new incident: a managed client asked for a blocked name"),
    "incident_storm": ("warning", "the open-incident table is full: untracked queries, since "
                                  "when, top rules"),
    "incident_flush_failed": ("error", "incidents could not be written (disk full...); DNS goes "
                                       "on"),
    "incident_webhook_dropped": ("warning", "an incident the webhook never got, and why"),
    "api_request": ("info", "an API call: method, path, actor, status, client address, ms; "
                            "never a token"),
    "token_created": ("info", "a personal API token was created: name, role, by whom (never "
                              "the token)"),
    "token_revoked": ("info", "a personal API token was revoked: name, by whom"),
    "api_auth_failed": ("warning", "an API request with no token or an unknown one: method, "
                                   "path, client address, reason (never the token)"),
    "http_error": ("error", "the HTTP server (`listener`: api or doh) failed a request other "
                            "than by the client's fault (a request the client got wrong is "
                            "only counted)"),
    "http_thread_failed": ("error", "the HTTP API's thread stopped after start (DNS goes on)"),
    "query_failed": ("error", "a query answered SERVFAIL by the pipeline's catch-all: a bug; "
                              "its traceback, once a minute per cause"),
    "dns_worker_died": ("error", "`dns.workers` > 1: a worker process exited; it is restarted"),
    "dns_worker_restarted": ("info", "a worker process runs again"),
    "dns_worker_restart_failed": ("error", "a worker process could not be started again"),
    "dns_worker_slow": ("warning", "workers did not carry out a request in time (device "
                                   "change, reload, scrape)"),
    "neighbour_table_unreadable": ("warning", "the kernel neighbour table could not be read "
                                              "(MACs unknown meanwhile)"),
    "netfilter_ready": ("info", "the kernel sets' backend is usable; `queued`: names blocked "
                                "before, learned now"),
    "netfilter_unavailable": ("error", "the kernel sets' backend is not usable (retried every "
                                       "10 s)"),
    "netfilter_sets_updated": ("info", "addresses written to the kernel sets"),
    "netfilter_exemptions_updated": ("info", "the exemption sets rewritten after a device "
                                             "change"),
    "netfilter_sets_restored": ("warning", "the sets were made anew (a firewall reload) and "
                                           "filled again"),
    "netfilter_write_failed": ("error", "addresses could not be written (counted, retried)"),
    "netfilter_exempt_failed": ("error", "the exemption sets could not be written (retried "
                                         "every 10 s)"),
    "netfilter_mac_exemptions_unavailable": ("warning", "ipset: the kernel has no hash:mac; "
                                                        "MAC exemptions are off"),
}
