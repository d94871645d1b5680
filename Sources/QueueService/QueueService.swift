// QueueService
