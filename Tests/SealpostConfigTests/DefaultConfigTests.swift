import Testing
@testable import SealpostConfig

/// The checkout's Config/sealpost.toml, found from this source file.
let checkoutConfig: String = {
    var parts = #filePath.split(separator: "/").map(String.init)
    parts.removeLast(3)   // Tests/SealpostConfigTests/<file>
    return "/" + parts.joined(separator: "/") + "/Config/sealpost.toml"
}()
let checkoutRoot = String(checkoutConfig.dropLast("/Config/sealpost.toml".count))

@Test func defaultFileParsesWithTheDocumentedValues() throws {
    let config = try SealpostConfiguration.load(path: checkoutConfig)
    #expect(config.file == checkoutConfig)
    #expect(config.dataDirectory == checkoutRoot + "/var")
    #expect(config.runtimeDirectory == checkoutRoot + "/var/run")
    #expect(config.injectSocket == checkoutRoot + "/var/run/inject")
    #expect(config.deliverSocket == checkoutRoot + "/var/run/deliver")
    #expect(config.controlSocket == checkoutRoot + "/var/run/control")
    #expect(config.spoolDirectory == checkoutRoot + "/var/queue")
    #expect(config.logDirectory == checkoutRoot + "/var/log")
    #expect(!config.hostname.isEmpty)
    #expect(config.hostname == config.hostname.lowercased())
    #expect(config.postmaster == "postmaster@localhost")
    #expect(config.queue.maximalQueueLifetime == 432_000)
    #expect(config.queue.bounceQueueLifetime == 432_000)
    #expect(config.queue.minimalBackoffTime == 300)
    #expect(config.queue.maximalBackoffTime == 4000)
    #expect(config.queue.queueRunDelay == 300)
    #expect(config.queue.delayWarningTime == 14_400)
    #expect(config.queue.messageSizeLimit == 10_240_000)
    #expect(config.queue.recipientLimit == 1000)
    #expect(config.queue.mapSize == 256 * 1024 * 1024)
    #expect(config.queue.mapSizeLimit == 16 * 1024 * 1024 * 1024)
    #expect(config.local.domains == ["localhost", config.hostname])
    #expect(config.local.isLocal(domain: config.hostname))
    #expect(config.local.accounts == .system)
    #expect(config.local.users == [])
    #expect(config.local.mailbox == "mail/{user}/Maildir")
    #expect(config.local.aliasesFile == checkoutRoot + "/Config/aliases")
    #expect(config.smtp.listen == ["127.0.0.1:2525"])
    #expect(config.smtp.submission == ["127.0.0.1:2587"])
    #expect(config.smtp.smtps == ["127.0.0.1:2465"])
    #expect(config.local.isLocal(domain: "LocalHost"))
    #expect(!config.local.isLocal(domain: "example.org"))
}
