package org.imsfhir.testserver;

import org.springframework.boot.web.context.WebServerInitializedEvent;
import org.springframework.context.ApplicationListener;
import org.springframework.stereotype.Component;

/** Prints the base URL once Tomcat listens, so a launcher that asked for port 0 can find it. */
@Component
public class ReadyAnnouncer implements ApplicationListener<WebServerInitializedEvent> {

	@Override
	public void onApplicationEvent(WebServerInitializedEvent event) {
		int port = event.getWebServer().getPort();
		System.out.println("IMS-FHIR-TEST-SERVER-LISTENING http://127.0.0.1:" + port + "/fhir");
		System.out.flush();
	}
}
