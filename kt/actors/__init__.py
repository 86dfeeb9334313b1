"""kt.actors: `kt.fn`, `kt.cls`, handles and method proxies, the scheduler (placement and
pools), named actors. Knows pods only through the provider interface, never which
backend runs them."""
