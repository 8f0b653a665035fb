"""tiktokguard: a DNS enforcement daemon that denies TikTok and ByteDance to managed devices."""

__version__ = "0.1.0"
