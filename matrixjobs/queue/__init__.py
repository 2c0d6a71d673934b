"""The queue: durable jobs and batches, workers, and the handlers that do the work."""

from matrixjobs.queue.command import CommandHandler
from matrixjobs.queue.handlers import Handler, HandlerRegistry, load_user_handlers
from matrixjobs.queue.queue import JobQueue

__all__ = ["CommandHandler", "Handler", "HandlerRegistry", "JobQueue", "load_user_handlers"]
