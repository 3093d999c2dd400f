"""The server side: the launcher, its watchdog and the processes it starts."""
