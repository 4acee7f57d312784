"""Migration: the S1..S7 core (sync), its asyncio driver, the three plans (co-migration,
Domain R alone, the baseline), MM_R (domr), MM_U per hypervisor (sim), the peer
protocol between agents (peer), the page stream and traces."""
