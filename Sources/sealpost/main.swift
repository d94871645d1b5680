// NAME
//	sealpost - Sealpost administration
// SYNOPSIS
//	sealpost queue list [--config file] [--socket path]
//	sealpost queue show [--raw] ID
//	sealpost queue flush [ID]
//	sealpost queue delete [--bounce] ID
//	sealpost queue hold ID
//	sealpost queue release ID
//	sealpost queue stats
//	sealpost user add [--sender address]... NAME
//	sealpost user passwd NAME
//	sealpost user delete NAME
//	sealpost user list
//	sealpost user senders NAME [address | @domain]...
// DESCRIPTION
//	The sealpost command is the administrator's view of the queue. It
//	never opens the spool: every command is one request on the queue's
//	control socket, and the queue, the only owner of the spool, does the
//	work.
//
//	queue list prints the queue like mailq(1): queue ID (followed by "!"
//	when the message is on hold, as Postfix shows it), size, arrival time
//	and sender, then each recipient with its state (pending, deferred,
//	sent, bounced), the number of attempts, the time of the next attempt
//	and, above it in parentheses, the last error.
//
//	queue show prints the envelope and the recipients of one message,
//	then the message itself (line ends converted to LF unless --raw).
//
//	queue flush asks for an immediate delivery attempt of one message, or
//	of every message. queue delete removes a message (with --bounce, its
//	sender gets a delivery status notification first; refused while a
//	delivery attempt is in progress, which may yet succeed). queue hold and
//	queue release stop and resume the delivery of a message. queue stats
//	prints the queue's counters.
//
//	Queue IDs are 12 hexadecimal digits, in any case.
//
//	user manages the SMTP AUTH accounts in the password file
//	smtp.auth_users (default Config/users): add, passwd (change the
//	password), delete, list (each name with the envelope senders it may
//	use), senders (set them: addresses or @domain; none restores the
//	default, NAME@each local domain). A password is asked twice with echo
//	off when standard input is a terminal, else read as one line from
//	standard input. The file is replaced atomically; a new one is created
//	with mode 0600, an existing one keeps its owner, group and mode.
//	smtp-listen reads it at start: restart it to apply a change.
// SOCKETS
//	The control socket, data_directory/run/control, protocol "control"
//	of Pipeline/PROTOCOL.md, section 4.4; its file mode decides who may
//	administer the queue. --socket names another socket.
// CONFIGURATION
//	Read to find the control socket: --config, else $SEALPOST_CONFIG,
//	else Config/sealpost.toml of the checkout holding this program, else
//	/etc/sealpost/sealpost.toml.
// PRIVILEGES
//	None beyond access to the control socket; user needs write access
//	to the directory of the password file (root, for the shipped layout).
// DIAGNOSTICS
//	Problems are reported on the standard error as "sealpost: reason".
// EXIT STATUS
//	0	the queue did what was asked.
//	64	usage error (EX_USAGE), e.g. a malformed queue ID, a bad user
//		name or password, passwords that differ.
//	65	user add: the user exists already (EX_DATAERR).
//	67	user passwd, delete, senders: no such user (EX_NOUSER).
//	69	the queue refused the request, e.g. no such message (EX_UNAVAILABLE).
//	70	internal error (EX_SOFTWARE).
//	75	the queue cannot be reached or lost the connection (EX_TEMPFAIL):
//		"sealpost: cannot reach the queue at PATH: REASON".
//	73	the password file cannot be written (EX_CANTCREAT).
//	76	the queue broke the protocol (EX_PROTOCOL).
//	78	the configuration or the password file cannot be read (EX_CONFIG).
// SEE ALSO
//	queue(8), the queue manager; Pipeline/PROTOCOL.md.

SealpostCommand.main()
