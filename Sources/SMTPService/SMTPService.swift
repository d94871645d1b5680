/// SMTPService: the I/O side of smtp-listen.
///
/// - `SMTPServer`: listeners (bound or inherited), sessions, shutdown.
/// - `SMTPSessionHandler`: drives `SMTP.SMTPServerSession` on a NIO channel.
/// - `InjectTransaction`: streams one message into the queue (inject protocol).
/// - `SMTPServiceSettings`, `SMTPLimits`, `SMTPTimeouts`: what a server needs.
/// - `ListenerSpec`, `SocketActivation`: where to listen.
/// - `NetworkPrefix`: trusted networks.
public enum SMTPServiceModule {
    public static let version = "1"
}
