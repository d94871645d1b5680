// The queue itself (QueueService with a real spool in a temporary
// directory), for what only it does to smtp-listen's inject connections.

import Foundation
import Logging
import NIOCore
import QueueService
import SealpostConfig
import Spool
import StageRuntime

final class RealQueue {
    let service: QueueService
    let injectSocket: String
    let logs = LogCapture()
    let spool: Spool
    private let directory: String

    init(injectIdleTimeout: TimeAmount) throws {
        directory = NSTemporaryDirectory() + "smtpsvc-queue-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        var config = SealpostConfiguration(file: directory + "/sealpost.toml")
        config.dataDirectory = directory
        config.deriveDataPaths()
        config.local.domains = ["example.test"]
        config.queue.mapSize = 8 << 20
        try FileManager.default.createDirectory(atPath: config.runtimeDirectory, withIntermediateDirectories: true)
        spool = try Spool(directory: config.spoolDirectory,
                              options: SpoolOptions(mapSize: config.queue.mapSize, mapSizeLimit: config.queue.mapSizeLimit))
        var options = QueueServiceOptions()
        options.injectIdleTimeout = injectIdleTimeout
        options.statisticsInterval = 0
        let capture = logs
        service = QueueService(configuration: config, paths: RuntimePaths(config), spool: spool, options: options,
                               logger: Logger(label: "queue") { _ in CapturingLogHandler(capture: capture) })
        injectSocket = config.injectSocket
        try service.start()
    }

    /// A queued message's bytes as stored (Received field first).
    func body(_ id: String) throws -> String {
        var bytes: [UInt8] = []
        try spool.readBody(QueueID(id)!) { bytes += $0 }
        return String(decoding: bytes, as: UTF8.self)
    }

    func stop() {
        service.stop()
        try? FileManager.default.removeItem(atPath: directory)
    }
}
