# tiktokguard container: the package built in one stage, run as a non-root user in a slim one.
#   docker build -t tiktokguard .
#   docker run -d --name tiktokguard -p 53:53/udp -p 53:53/tcp -p 127.0.0.1:8053:8053 \
#       -v tiktokguard-state:/var/lib/tiktokguard \
#       -v /etc/tiktokguard/tiktokguard.toml:/etc/tiktokguard/tiktokguard.toml:ro tiktokguard
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tiktokguard ./tiktokguard
COPY blocklists ./blocklists
RUN python -m venv /opt/tiktokguard \
    && /opt/tiktokguard/bin/pip install --no-cache-dir /src

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="tiktokguard" \
      org.opencontainers.image.description="DNS enforcement daemon: TikTok and ByteDance denied to managed devices"
RUN groupadd --system --gid 10053 tiktokguard \
    && useradd --system --uid 10053 --gid tiktokguard --home-dir /var/lib/tiktokguard \
       --shell /usr/sbin/nologin tiktokguard \
    && install -d -o tiktokguard -g tiktokguard -m 0700 /var/lib/tiktokguard
COPY --from=build /opt/tiktokguard /opt/tiktokguard
COPY docker/tiktokguard.toml /etc/tiktokguard/tiktokguard.toml
ENV PATH="/opt/tiktokguard/bin:${PATH}" \
    PYTHONUNBUFFERED=1
USER 10053:10053
WORKDIR /var/lib/tiktokguard
VOLUME ["/var/lib/tiktokguard"]
# Port 53 as a non-root user: Docker (20.10+) lets containers bind low ports
# (net.ipv4.ip_unprivileged_port_start=0 in the container's network namespace).
EXPOSE 53/udp 53/tcp 8053/tcp
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8053/healthz', timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tiktokguard"]
CMD ["serve", "--config", "/etc/tiktokguard/tiktokguard.toml", "--log-format", "json"]
